"""The paper's analyses, each a command with a JSON record and a plot (``istune analyze ...``).

* :mod:`istune.analysis.removal` — Figure 2(a): remove a trained run's adapters layer by
  layer (β = 0, eq. 8) in several orders and follow the held-out loss and perplexity.
* :mod:`istune.analysis.layer_training` — Figure 2(b): fine-tune only chosen layers (the
  most or least important k, or all) and compare their held-out loss.
* :mod:`istune.analysis.sweep` — Tables 10, 11 and 4: μ, β and the sparse-tuning ablation
  (all layers vs random vs IST at N_u = 4 and 8), resumable run by run.

Shared pieces: :mod:`istune.analysis.run_folder` loads a finished ``istune train`` folder
back; :mod:`istune.analysis.training_runs` trains and records runs resumably;
:mod:`istune.analysis.plots` draws the figures; :mod:`istune.analysis.cli` is the command line.
"""
