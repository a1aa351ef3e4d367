"""The store's batch reader moved into the library: ``mmkd_core.loader`` (StoreBatches, CaptionTable,
make_loader) and ``mmkd_core.batch_order`` (the epoch's batch order, once called its plan). The old names are
kept here for the modules that still import them."""

# SHIM: remove at integration
from mmkd_core.batch_order import OrderSpec as PlanSpec  # noqa: F401
from mmkd_core.batch_order import check_order as check_plan  # noqa: F401
from mmkd_core.batch_order import epoch_batches as plan_batches  # noqa: F401
from mmkd_core.batch_order import epoch_order as epoch_plan  # noqa: F401
from mmkd_core.batch_order import num_batches, rank_range  # noqa: F401
from mmkd_core.loader import CaptionTable, StoreBatches, make_loader  # noqa: F401
