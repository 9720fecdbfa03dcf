"""The hessian-tools application, built on the library (``hessian_tools`` minus this package).

It wires checkpoints, the embedded models and data, training runs and the command line to the library's
operators, estimators and bounds, and turns their results into reports and figures:

* :mod:`.zoo` — the embedded models (MLP, small CNN, small ResNet) and datasets (digits, synthetic);
* :mod:`.runs` — seeded, resumable training runs that write run folders;
* :mod:`.io`, :mod:`.checkpoints` — atomic writes, safe (weights-only) checkpoint loading, run-folder
  resolution;
* :mod:`.pipeline`, :mod:`.curves`, :mod:`.demo`, :mod:`.experiments` — the analyses and experiments;
* :mod:`.report`, :mod:`.plots` — markdown tables and figures, drawn from results only;
* :mod:`.cli` — the ``hessian-tools`` command.

The library never imports this package.
"""
