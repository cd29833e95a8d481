"""The layers tab (features "layers" and "spectrum"): ‖K_layer(x_o, x_u)‖_F per parameter
group for the selected pair, and the NTK spectrum of a probe set on a log scale (earlier
spectra stay as faded curves)."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton

from ntkviz.app.features.layers import LayersRequest, SpectrumRequest
from ntkviz.gui.features.base import ProbeView
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import elide_path, model_step, plain_numbers, wrap_title
from ntkviz.gui.widgets import JobControls, labelled, spin

BAR_TITLE = "‖K<sub>layer</sub>(x<sub>o</sub>, x<sub>u</sub>)‖<sub>F</sub>"
BAR_AXIS = "‖K<sub>layer</sub>‖<sub>F</sub>"
#: Layer names on the axis are cut to this many characters (the full name on hover).
NAME_WIDTH = 18
#: Pixels a layer's name needs on the axis; denser rows name every k-th layer.
ROW_PIXELS = 14


class LayerBars(pg.BarGraphItem):
    """Horizontal bars, one per layer (row k at y = k), whose tooltip names the hovered one."""

    def __init__(self):
        super().__init__(x0=[], y=[], width=[], height=0.6, brush="#4c72b0")
        self.names: tuple[str, ...] = ()

    def hoverEvent(self, ev):
        widths = self.opts["width"]
        k = -1 if ev.isExit() else int(np.floor(ev.pos().y() + 0.5))
        inside = 0 <= k < len(self.names) and 0 <= ev.pos().x() <= widths[k]
        self.setToolTip(f"{self.names[k]}: ‖K‖_F = {widths[k]:.4g}" if inside else "")


class LayersView(ProbeView):
    """Split K by layer (the main job) and the spectrum (a second job)."""

    name = "layers"
    marks_stale = True
    title = "Layers"
    tooltip = "Layers & spectrum"
    run_text = "Split K for the selected pair"
    MAX_SPECTRA = 8

    def __init__(self, ctx):
        super().__init__(ctx)
        self.spectra: list = []
        self.n_box = spin(10, 500, 50, 10)
        self.spectrum_job = JobControls("Compute spectrum")
        self.clear_button = QPushButton("Clear old spectra")
        self.add_controls(self.job, labelled("spectrum of N =", self.n_box), self.spectrum_job,
                          self.clear_button, self.export_button, self.stale_note)  # fmt: skip
        self.bar_plot = self.graphics.addPlot(0, 0, title=BAR_TITLE)
        self.bar_plot.setMenuEnabled(False)
        self.bar_plot.invertY(True)  # the first layer on top
        self.bar_plot.setLabel("bottom", BAR_AXIS)
        self.bars = LayerBars()
        self.bar_plot.addItem(self.bars)
        self.total_line = pg.InfiniteLine(angle=90, pen=pg.mkPen("#d62728", style=Qt.DashLine))
        self.bar_plot.addItem(self.total_line)
        self._ticks = None
        self.bar_plot.vb.sigResized.connect(lambda vb: self._set_ticks())
        self.spec_plot = self.graphics.addPlot(0, 1, title="NTK spectrum (Gram matrix eigenvalues)")
        self.spec_plot.setLogMode(x=False, y=True)
        plain_numbers(self.bar_plot, self.spec_plot)
        for plot in (self.bar_plot, self.spec_plot):
            wrap_title(plot)
        for column, (plot, stretch) in enumerate(((self.bar_plot, 3), (self.spec_plot, 2))):
            plot.setPreferredWidth(100)  # the widths follow the stretch: room for the names
            self.graphics.ci.layout.setColumnStretchFactor(column, stretch)
        self.spec_plot.setLabel("bottom", "rank")
        self.spec_plot.setLabel("left", "eigenvalue")
        self.spec_plot.addLegend(offset=(-5, 5), labelTextSize="8pt")
        self.spec_curves: list = []
        self.clear_button.clicked.connect(self.clear_spectra)
        self.spectrum_job.run_clicked.connect(self.run_spectrum)
        self.spectrum_job.cancel_clicked.connect(lambda: self.controller.cancel("spectrum"))
        self.controller.on("spectrum", self._on_spectrum)
        self.clear()  # the empty plots' ranges until the first split and spectrum

    def plots(self):
        return {"Layers and spectrum": lambda: self.graphics.ci}

    def request(self) -> LayersRequest:
        return LayersRequest(self.controller.pair())

    def run_spectrum(self) -> None:
        if self.controller.ready:
            self.spectrum_job.set_running(True)
            self.controller.submit("spectrum", SpectrumRequest(self.n_box.value()))

    def _on_spectrum(self, event) -> None:
        self.spectrum_job.follow(event)
        if event.kind == "result":
            self.set_spectrum(event.payload)
            self.ctx.shown("spectrum", event.payload)

    def show_result(self, result) -> None:
        """``result``: a ``LayerResult``."""
        n = len(result.names)
        self.bars.names = result.names
        self.bars.setOpts(x0=np.zeros(n), y=np.arange(n), width=result.norms)
        self._set_ticks()
        self.total_line.setPos(result.total_norm)
        self.bar_plot.setLabel(
            "bottom", f"{BAR_AXIS}; <span style='color:#d62728'>all layers: {result.total_norm:.3g}"
            "</span>"
        )  # fmt: skip
        r = result.request
        self.bar_plot.setTitle(
            f"‖K<sub>layer</sub>‖<sub>F</sub>: x<sub>o</sub> = {r.x_o}, "
            f"x<sub>u</sub> = {r.x_u}, {model_step(result)}"
        )
        top = max(result.total_norm, float(result.norms.max())) * 1.05
        self.bar_plot.setRange(xRange=(0, top), yRange=(-0.6, n - 0.4), padding=0)

    def _set_ticks(self) -> None:
        """Name the layers on the left axis: every one, or every k-th where rows are denser
        than :data:`ROW_PIXELS`."""
        names = self.bars.names
        rows = max(1, int(self.bar_plot.vb.height() // ROW_PIXELS))
        step = -(-len(names) // rows) if names else 1
        ticks = [(k, elide_path(names[k], NAME_WIDTH)) for k in range(0, len(names), step)]
        if ticks != self._ticks:
            self._ticks = ticks
            self.bar_plot.getAxis("left").setTicks([ticks] if names else None)

    def clear(self) -> None:
        self.bars.names = ()
        self.bars.setOpts(x0=[], y=[], width=[])
        self._set_ticks()
        self.total_line.setPos(0)
        self.bar_plot.setLabel("bottom", BAR_AXIS)
        self.bar_plot.setTitle(BAR_TITLE)
        self.bar_plot.setRange(xRange=(0, 1), yRange=(-0.6, 4.6), padding=0)  # until a split
        self.spectra = []
        self._draw_spectra()

    def set_spectrum(self, result) -> None:
        """``result``: a ``SpectrumResult``; earlier ones fade."""
        self.spectra.append(result)
        self.spectra = self.spectra[-self.MAX_SPECTRA :]
        self._draw_spectra()

    def clear_spectra(self) -> None:
        self.spectra = self.spectra[-1:]
        self._draw_spectra()

    def _draw_spectra(self) -> None:
        for c in self.spec_curves:
            self.spec_plot.removeItem(c)
        self.spec_curves = []
        legend = self.spec_plot.legend
        if legend is not None:
            legend.clear()
        n = len(self.spectra)
        for k, s in enumerate(self.spectra):
            eig = np.clip(s.eigenvalues, 1e-12, None)
            latest = k == n - 1
            alpha = 255 if latest else int(60 + 120 * k / max(n - 1, 1))
            pen = pg.mkPen((31, 119, 180, alpha) if latest else (120, 120, 120, alpha),
                           width=2.5 if latest else 1.5)  # fmt: skip
            curve = self.spec_plot.plot(np.arange(1, len(eig) + 1), eig, pen=pen,
                                        name=f"step {s.step} (N = {len(s.indices)})")  # fmt: skip
            self.spec_curves.append(curve)
        if self.spectra:  # every eigenvalue of every spectrum in view
            self.spec_plot.enableAutoRange()
        else:  # until the first spectrum
            self.spec_plot.setRange(xRange=(0, 50), yRange=(-2, 3))

    def data(self) -> dict[str, np.ndarray]:
        out = {}
        if self.result is not None:
            out["layer_norms"] = self.result.norms
            for name, block in self.result.blocks.items():
                out[f"K_{name}"] = block
        for k, s in enumerate(self.spectra):
            out[f"spectrum_{k}_step{s.step}"] = s.eigenvalues
        return out
