"""cifhkd: the CIF-HKD speech recognizer built on cifops (the recipe's library).

The modules: ``data`` (manifests and audio), ``files`` (atomic writes, SHA-256),
``sampler`` (the bucketing batch sampler), ``features`` and ``fbank`` (fbank,
SpecAugment), ``teacher`` (the BERT-like teacher and the ASR vocabulary),
``teacher_cache`` (the cached teacher states), ``dataset`` (items), ``batch`` (the
training batch and its collation; with ``dataset``, what a data-loader worker imports:
never ``model`` or cifops), ``model`` (the CIF-HKD model), ``train`` (the training loop),
``rundir`` (what ``train`` writes into an experiment folder, and refuses; the
checkpoints), ``decode`` (beam search, scoring,
loading a checkpoint), ``corpus`` (the synthetic demo corpus), ``plot_alignment``, ``demo``
(the CPU demo) and ``progress`` (its live status line). The scripts in python/ are their
command lines.

It is its own distribution (recipe/pyproject.toml in the cifops repository: ``pip
install -e ./recipe``), depending on cifops; ``import cifops`` never imports it, and
``pip install cifops`` installs the ops alone. conf/ holds the demo's options (package
data).
"""
