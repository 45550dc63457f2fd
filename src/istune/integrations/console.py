"""A console a person can read while ISTCallback trains: one short line per log.

The Trainer prints every entry of each log (``ProgressCallback``; ``PrinterCallback`` with
``disable_tqdm``). ISTCallback adds N_L importance values and N_L selection shares to every
log so that the reporters (TensorBoard, W&B, ``log_history``) get the per-layer series;
printed as they are, that is a line of thousands of characters. ISTCallback therefore
swaps the Trainer's two printers for these subclasses, which print the same log with the
per-layer series replaced by the current top layers by importance:

    {'loss': '0.4312', 'grad_norm': '1.25', 'learning_rate': '0.0002', 'epoch': '0.4',
     'ist/probe_loss': '0.4478', 'ist/top_layers': '17 3 25 8 11'}

Nothing else changes: the reporters and ``ist_log.jsonl`` still get every value.
"""

from __future__ import annotations

from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

PER_LAYER_PREFIXES = ("ist/importance/layer_", "ist/selected/layer_")
IMPORTANCE_PREFIX = "ist/importance/layer_"
TOP_LAYERS = 5


def console_logs(logs: dict, top: int = TOP_LAYERS) -> dict:
    """``logs`` without the per-layer series, plus ``ist/top_layers``: the ``top`` layers by importance, best first.

    ``ist/top_layers`` is left out while every layer has the same importance (before the first update).
    """
    shown = {key: value for key, value in logs.items() if not key.startswith(PER_LAYER_PREFIXES)}
    importance = {int(key[len(IMPORTANCE_PREFIX):]): value for key, value in logs.items()
                  if key.startswith(IMPORTANCE_PREFIX)}
    if len(set(importance.values())) > 1:  # before the first importance update all are equal: nothing to rank
        best = sorted(importance, key=lambda layer: (-importance[layer], layer))[:top]
        shown["ist/top_layers"] = " ".join(str(layer) for layer in best)
    return shown


class ReadableProgressCallback(ProgressCallback):
    """The Trainer's progress bar; each log line without the per-layer series."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class ReadablePrinterCallback(PrinterCallback):
    """The Trainer's plain printer (``disable_tqdm``); each log line without the per-layer series."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


_READABLE = {ProgressCallback: ReadableProgressCallback, PrinterCallback: ReadablePrinterCallback}


def use_readable_console(handler: CallbackHandler | None) -> None:
    """Replace the Trainer's own printers in ``handler`` by the readable ones, keeping their state.

    Only the exact transformers classes are replaced: a printer of the user's own is left as it is.
    """
    if handler is None:
        return
    for index, callback in enumerate(handler.callbacks):
        readable = _READABLE.get(type(callback))
        if readable is not None:
            replacement = readable.__new__(readable)
            replacement.__dict__.update(callback.__dict__)  # an open progress bar carries on
            handler.callbacks[index] = replacement
