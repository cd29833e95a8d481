"""The Qt-free application layer: what the desktop app does, without the widgets.

* :mod:`~ntkviz.app.messages` — commands to the engine and events from it (immutable).
* :mod:`~ntkviz.app.jobs` — the job protocol (generators yielding progress, then a result) and
  the :class:`~ntkviz.app.jobs.JobRunner`.
* :mod:`~ntkviz.app.engine` — the :class:`~ntkviz.app.engine.Engine`: owns data, model,
  optimizer, training run and undo stack; driven by ``tick()`` on one thread.
* :mod:`~ntkviz.app.state` — the evented :class:`~ntkviz.app.state.AppState` (psygnal).
* :mod:`~ntkviz.app.controller` — the :class:`~ntkviz.app.controller.AppController`.
* :mod:`ntkviz.app.features` — one module per feature: its requests, jobs, results and state.

Nothing here imports Qt; only the engine and the jobs' bodies import PyTorch, so the GUI can
show its window before PyTorch is loaded.
"""
