"""The views of the features, one module each. The window builds what :data:`FEATURES` lists,
in this order (docks left and right, the centre tab, then the other tabs)."""

from ntkviz.gui.features.examples import ExamplesView
from ntkviz.gui.features.influence import InfluenceView
from ntkviz.gui.features.kernel_maps import KernelMapView
from ntkviz.gui.features.layers import LayersView
from ntkviz.gui.features.pair import PairView
from ntkviz.gui.features.squeeze import SqueezeView
from ntkviz.gui.features.training import TrainingView
from ntkviz.gui.features.watch import WatchView

FEATURES = (
    TrainingView,
    ExamplesView,
    PairView,
    InfluenceView,
    WatchView,
    KernelMapView,
    SqueezeView,
    LayersView,
)
