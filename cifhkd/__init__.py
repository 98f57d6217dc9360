"""cifhkd: the CIF-HKD speech recognizer built on cifops (the recipe's library).

The modules: ``data`` (manifests, audio, atomic writes, the bucketing sampler),
``features`` (fbank, SpecAugment), ``teacher`` (the BERT-like teacher and the ASR
vocabulary), ``teacher_cache`` (the cached teacher states), ``dataset`` (items and
batches), ``model`` (the CIF-HKD model), ``train`` (the training loop), ``rundir`` (what
``train`` writes into an experiment folder, and refuses), ``decode`` (beam search, scoring,
loading a checkpoint), ``corpus`` (the synthetic demo corpus), ``plot_alignment``, ``demo``
(the CPU demo) and ``progress`` (its live status line). The scripts in python/ are their
command lines.

Its dependencies are the ``train`` extra (``pip install -e '.[train]'``); ``import cifops``
never imports this package.
"""
