"""AdaLoRA under IST: ranks are reallocated, frozen layers do not crash it, probes carry no regulariser."""

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

from istune import ISTCallback, ISTConfig, SparseTuner

from ..tiny_models import tiny_model
from .test_hf import TokenDataset


def _adalora_model(total_step):
    config = peft.AdaLoraConfig(init_r=4, target_r=1, target_modules=["q_proj", "v_proj", "up_proj"],
                                total_step=total_step, tinit=2, tfinal=2, deltaT=1, orth_reg_weight=0.5,
                                task_type="CAUSAL_LM")
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_model("llama", num_layers=4), config)


@pytest.mark.parametrize("strategy", ["ist", "all"])
def test_ranks_are_reallocated_during_training(tmp_path, strategy):
    steps = 12
    model = _adalora_model(steps)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=100)
    ist = ISTCallback(ISTConfig(strategy=strategy, probe_interval=2))
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[ist]).train()
    allocator = model.base_model.rankallocator
    pattern = model.peft_config["default"].rank_pattern
    kept = {name: sum(mask) for name, mask in pattern.items()}
    assert allocator.init_bgt == 4 * 12 and allocator.target_bgt == 12
    assert sum(kept.values()) == allocator.target_bgt  # the budget went down as configured
    assert len(set(kept.values())) > 1  # and was reallocated unevenly across modules
    for name, parameter in model.base_model.model.named_parameters():
        if name in pattern:  # masked ranks are zero
            assert all(value == 0 for value, keep in zip(parameter.view(-1).tolist(), pattern[name]) if not keep)


def test_probe_losses_carry_no_orthogonality_regulariser():
    model = _adalora_model(10)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    tuner = SparseTuner(model, ISTConfig(probe_fraction=1.0))  # one candidate: every layer at full strength
    probe = tuner.probe_losses(batch, [list(range(tuner.num_layers))])
    model.eval()
    with torch.no_grad():
        plain = model.base_model.model(**batch).loss  # the task loss alone
        regularised = model(**batch).loss
    assert probe.item() == pytest.approx(plain.item(), rel=1e-6)
    assert regularised.item() > plain.item() + 1e-4


def test_plain_loop_reallocates_ranks_too():
    from istune.integrations.loop import train

    steps = 12
    model = _adalora_model(steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [TokenDataset()[i] for i in range(steps)]
    batches = [{k: v.unsqueeze(0) for k, v in b.items()} for b in batches]
    train(model, optimizer, batches, ISTConfig(probe_interval=2), probe_batches=lambda: batches[0])
    allocator = model.base_model.rankallocator
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(mask) for mask in pattern.values()) == allocator.target_bgt < allocator.init_bgt
