"""The recipe layer behind ``istune train | eval | plot``: loading models, adding PEFT methods,
the Trainer run with IST, evaluation and plots. Built on the framework-free core
(:mod:`istune.core`) and its thin integrations (:mod:`istune.integrations`)."""
