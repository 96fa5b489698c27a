"""The composition root: the root ``tier3`` command and ``tier3 demo``.

The only package that imports both ``streams`` and ``trainer``. It exists so that the dependency rule is true, not
only on paper: ``streams/`` and ``trainer/`` never import each other (they meet through the topics and
``schemas/``); whatever needs both of them (one command line with every sub-command, the demo that runs the whole
flywheel) lives here.
"""
