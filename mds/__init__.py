"""mds: embedded market-data storage for Upbit (KRW markets).

Candles are kept in tiers (memory, LMDB, SQLite) above a Layer 1 exchange router; realtime
tickers, orderbooks and trades live in memory. See README.md and docs/ARCHITECTURE.md.
"""

from mds._dtypes import CANDLE_DTYPE, TRADE_DTYPE
from mds.convert import candles_from_upbit, candles_to_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, Layer1Error, MdsError, StorageUnavailableError
from mds.frames import to_arrow, to_pandas, to_polars
from mds.layer1.connector import SmartRouterConnector
from mds.models import (
    CheckReport,
    Config,
    DataType,
    Gap,
    MaintenanceReport,
    SeriesInfo,
    StorageMetadata,
    StorageRequest,
    StorageResponse,
    WriteResult,
)
from mds.resampling import resample
from mds.store import Store, open
from mds.symbols import validate_symbol
from mds.timeframes import Timeframe, parse_timeframe

__version__ = "0.1.0"

__all__ = [
    "CANDLE_DTYPE",
    "CheckReport",
    "Config",
    "DataType",
    "Gap",
    "InvalidCandleError",
    "InvalidRequestError",
    "Layer1Error",
    "MaintenanceReport",
    "MdsError",
    "SeriesInfo",
    "SmartRouterConnector",
    "StorageMetadata",
    "StorageRequest",
    "StorageResponse",
    "StorageUnavailableError",
    "Store",
    "TRADE_DTYPE",
    "Timeframe",
    "WriteResult",
    "__version__",
    "candles_from_upbit",
    "candles_to_upbit",
    "open",
    "parse_timeframe",
    "resample",
    "to_arrow",
    "to_pandas",
    "to_polars",
    "validate_symbol",
]
