"""The training dock (feature "training"): hyper-parameters, run buttons, progress with ETA,
and the loss and accuracy curves of the current run."""

from __future__ import annotations

import math
import time
from dataclasses import replace

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ntkviz.app.features.training import RunCurves, RunProgress
from ntkviz.gui.features.base import FeatureView
from ntkviz.gui.plots import TrainingCurves
from ntkviz.gui.widgets import ScientificSpinBox, double_spin, fit_text

NO_CUDA = (
    "CUDA is not available: torch.cuda.is_available() is False (no NVIDIA GPU, driver, or CUDA "
    "build of PyTorch)"
)


#: The optimizers a run can take: (TrainConfig.optimizer, shown name, tooltip).
OPTIMIZERS = (
    ("sgd", "SGD", "torch.optim.SGD with the momentum and weight decay below"),
    ("adam", "Adam", "torch.optim.Adam (β = (0.9, 0.999), ε = 1e-8); weight decay as L2"),
    ("adamw", "AdamW", "torch.optim.AdamW (β = (0.9, 0.999), ε = 1e-8); decoupled weight decay"),
)


class TrainingView(FeatureView):
    """Settings, Start / Pause / Resume / Stop / One batch, progress and curves."""

    name = "training"
    title = "Training"
    placement = "left"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._shown_model = -1  # the model number whose settings the dock took
        self.model_box = QComboBox()
        self.train_size = QSpinBox()
        self.train_size.setRange(0, 60000)
        self.train_size.setSingleStep(1000)
        self.train_size.setSpecialValueText("all")
        self.train_size.setToolTip("examples drawn (seeded) from the training split; 0 = all")
        self.lr = ScientificSpinBox(1e-7, 1000.0)
        self.optimizer = QComboBox()
        for key, text, tip in OPTIMIZERS:
            self.optimizer.addItem(text, key)
            self.optimizer.setItemData(self.optimizer.count() - 1, tip, Qt.ToolTipRole)
        self.momentum = double_spin(0, 0.999, 3, 0.05)
        self.optimizer.currentIndexChanged.connect(
            lambda: self.momentum.setEnabled(self.optimizer.currentData() == "sgd")
        )
        self.weight_decay = double_spin(0, 1, 6, 1e-4)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.device = QComboBox()
        for name in ("auto", "cpu", "cuda"):
            self.device.addItem(name, name)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for label, widget in (
            ("Model", self.model_box), ("Training set", self.train_size),
            ("Learning rate", self.lr), ("Optimizer", self.optimizer),
            ("Momentum", self.momentum),
            ("Weight decay", self.weight_decay), ("Batch size", self.batch_size),
            ("Epochs", self.epochs), ("Seed", self.seed), ("Device", self.device),
        ):  # fmt: skip
            form.addRow(label, widget)
        # the run's settings (all the form but the Model box), greyed while there is no model
        self._settings = [form.itemAt(row, QFormLayout.FieldRole).widget()
                          for row in range(1, form.rowCount())]  # fmt: skip
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("start a new run from freshly initialised weights")
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.stop_button = QPushButton("Stop")
        self.batch_button = QPushButton("One batch")
        self.batch_button.setToolTip("train exactly one batch, then pause")
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip(
            "train the current model further (trained or loaded from a checkpoint) with these "
            "settings: a fresh optimizer and learning-rate schedule; the model stays the same"
        )
        fit_text(
            self.start_button, self.continue_button, self.batch_button, self.pause_button,
            self.resume_button, self.stop_button,
        )  # fmt: skip
        buttons = QGridLayout()
        for k, b in enumerate(
            (self.start_button, self.continue_button, self.batch_button, self.pause_button,
             self.resume_button, self.stop_button)
        ):  # fmt: skip
            buttons.addWidget(b, k // 3, k % 3)
        self.progress = QProgressBar()
        self.progress.setFormat("step %v / %m")
        self.eta = QLabel("not started")
        self.accuracy = QLabel("test accuracy: –")
        self.accuracy.setToolTip("accuracy on the test images of the run's periodic evaluation")
        for label in (self.eta, self.accuracy):
            label.setWordWrap(True)  # a long line must not widen the dock
        self.run_curves = RunCurves()
        self.curves = TrainingCurves(self.run_curves)
        self.run_progress = RunProgress()
        self._pending_progress = None
        self._progress_timer = QTimer(self)  # repaint progress at most 4 times a second
        self._progress_timer.setSingleShot(True)
        self._progress_timer.setInterval(250)
        self._progress_timer.timeout.connect(self._show_progress)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.eta)
        lay.addWidget(self.accuracy)
        lay.addWidget(self.curves, 1)
        c, s = self.controller, self.state
        self.start_button.clicked.connect(lambda: c.start_training(self.config()))
        self.pause_button.clicked.connect(c.pause)
        self.resume_button.clicked.connect(c.resume)
        self.stop_button.clicked.connect(c.stop)
        self.batch_button.clicked.connect(lambda: c.one_batch(self.config()))
        self.continue_button.clicked.connect(lambda: c.continue_training(self.config()))
        self.model_box.currentIndexChanged.connect(self._model_chosen)
        s.events.engine.connect(self._on_engine)
        s.events.dataset.connect(self._on_dataset)
        s.events.model.connect(self._on_model)
        s.events.run_state.connect(self._on_run_state)
        c.on("records", self._on_records)
        c.on("new_run", self._on_new_run)
        self._on_run_state("loading")

    def plots(self):
        return {
            "Training loss": lambda: self.curves.loss_plot.getPlotItem(),
            "Test accuracy": lambda: self.curves.acc_plot.getPlotItem(),
        }

    def session_state(self) -> dict:
        return {"curves": self.run_curves.to_dict()}

    def restore_session(self, part: dict) -> None:
        self.run_curves.restore(part["curves"])
        self.controller.records_received = len(self.run_curves.steps)
        self.curves.flush()
        self._show_accuracy()

    def model_replaced(self, info) -> None:
        """The curves and progress were of the old model's run."""
        self._on_new_run(None)
        self._pending_progress = None
        self.progress.reset()
        self.eta.setText("not started" if info.step == 0 else f"trained for {info.step} steps")

    # ------------------------------------------------------------------ settings
    def _on_engine(self, info) -> None:
        """Fill the model list; disable CUDA (saying why) when it is absent."""
        self.model_box.clear()
        for name, description in info.models.items():
            self.model_box.addItem(name, name)
            self.model_box.setItemData(self.model_box.count() - 1, description, Qt.ToolTipRole)
        item = self.device.model().item(2)
        item.setEnabled(info.cuda_available)
        if info.cuda_available:
            item.setToolTip("train on the GPU")
            self.device.setToolTip("auto: the GPU (CUDA) when there is one, else the CPU")
        else:
            item.setText("cuda (not available)")
            item.setToolTip(NO_CUDA)
            self.device.setToolTip(f"auto and cpu train on the CPU. {NO_CUDA}.")

    def _on_dataset(self, info) -> None:
        """Other data: the curves were of another run; the training set ranges over it."""
        self._on_new_run(None)
        n = info.size("train")
        self.train_size.setRange(0, n)
        self.train_size.setSingleStep(max(1, 10 ** (len(str(n)) - 2)))

    def _on_model(self, info) -> None:
        """A new model (not a trained run's) shows its own settings; the same model stepped or
        undone keeps the user's choices in the dock."""
        if info is None or info.number == self._shown_model:
            return
        self._shown_model = info.number
        if info.source != "trained":
            self.set_config(info.config)

    def _model_chosen(self) -> None:
        self.state.model_kind = self.model_box.currentData()

    def set_config(self, c) -> None:
        """Show a ``TrainConfig``."""
        self.model_box.setCurrentIndex(max(self.model_box.findData(c.model), 0))
        self.train_size.setValue(c.train_size or 0)
        self.lr.setValue(c.lr)
        self.optimizer.setCurrentIndex(max(self.optimizer.findData(c.optimizer), 0))
        self.momentum.setValue(c.momentum)
        self.weight_decay.setValue(c.weight_decay)
        self.batch_size.setValue(c.batch_size)
        self.epochs.setValue(c.epochs)
        self.seed.setValue(c.seed)
        device = c.device if c.device in ("auto", "cpu", "cuda") else "auto"
        self.device.setCurrentIndex(self.device.findData(device))

    def config(self):
        """A ``TrainConfig`` from the fields (other settings from the current model's)."""
        base = self.state.model.config
        return replace(
            base,
            model=self.state.model_kind or base.model,
            train_size=self.train_size.value() or None,
            lr=self.lr.value(),
            optimizer=self.optimizer.currentData(),
            momentum=self.momentum.value(),
            weight_decay=self.weight_decay.value(),
            batch_size=self.batch_size.value(),
            epochs=self.epochs.value(),
            seed=self.seed.value(),
            device=self.device.currentData(),
        )

    # ------------------------------------------------------------------ the run
    def _on_run_state(self, state: str) -> None:
        """Enable the buttons that make sense in ``state``; show the latest records."""
        ready = state not in ("loading", "no model")
        for field in self._settings:  # no model: they are nobody's settings
            field.setEnabled(state != "no model")
        self.start_button.setEnabled(ready and state != "training")
        self.pause_button.setEnabled(state == "training")
        self.resume_button.setEnabled(state == "paused")
        self.stop_button.setEnabled(state in ("training", "paused"))
        self.batch_button.setEnabled(ready and state != "training")
        self.continue_button.setEnabled(ready and state not in ("training", "paused"))
        self.curves.flush()
        self._show_progress()
        if state in ("finished", "stopped", "paused"):
            self.run_progress.reset()
        step, total = self.run_progress.step, self.run_progress.total
        self.eta.setToolTip("")  # a judgement of an earlier run no longer applies
        if state == "finished":
            self.eta.setText(f"finished: {step} steps")
            self._judge_run()
        elif state == "stopped" and total:
            self.eta.setText(f"stopped at step {step} of {total}")
        elif state == "paused" and total:
            self.eta.setText(f"paused at step {step} of {total}")
        elif state == "no model":
            self.eta.setText("no model: File ▸ Open model… or Open dataset…")

    def _judge_run(self) -> None:
        """A finished run that ended far worse than it started (a learning rate that diverges
        without overflowing) is reported, as the CLI does."""
        from ntkviz.training import run_health

        c, dataset = self.run_curves, self.state.dataset
        if not c.losses or dataset is None:
            return
        accuracy = c.accuracies[-1] if c.accuracies else None
        health = run_health(c.losses, accuracy, len(dataset.classes))
        if not health.ok:
            self.eta.setText(f"{self.eta.text()}, far worse than it started")
            self.eta.setToolTip(health.warning)
            self.ctx.error("The run went wrong", health.warning[0].upper() + health.warning[1:])

    def _on_new_run(self, event) -> None:
        self.run_curves.clear()
        self.run_progress.reset()
        self._show_accuracy()

    def _on_records(self, event) -> None:
        records = event.payload
        self.run_curves.add(records)
        if any(r.test_accuracy is not None for r in records):
            self._show_accuracy()
        self._pending_progress = self.run_progress.update(records, time.perf_counter())
        if self.state.run_state != "training":  # a last batch or one step: show it now
            self.curves.flush()
            self._show_progress()
        elif not self._progress_timer.isActive():
            self._progress_timer.start()
        self.ctx.shown("records", self.controller.records_received)

    def _show_accuracy(self) -> None:
        """The run's latest test accuracy."""
        c = self.run_curves
        if not c.accuracies:
            self.accuracy.setText("test accuracy: –")
            return
        size, n = self.state.model.config.eval_size, self.state.dataset.size("test")
        images = "all test images" if size is None or size >= n else f"{size:,} test images"
        self.accuracy.setText(
            f"test accuracy {100 * c.accuracies[-1]:.1f} % at step {c.acc_steps[-1]} ({images})"
        )

    def _show_progress(self) -> None:
        self._progress_timer.stop()
        if self._pending_progress is None:
            return
        step, total, eta = self._pending_progress
        self._pending_progress = None
        self.progress.setMaximum(total)
        self.progress.setValue(step)
        if eta is None or not math.isfinite(eta):
            self.eta.setText(f"step {step} of {total}")
        else:
            m, s = divmod(round(eta), 60)
            self.eta.setText(f"{100 * step / total:.0f} % · ETA {m}:{s:02d}")
