"""Layer 1: the exchange router mds sits on (DESIGN.md section 5).

- :class:`SmartRouterConnector` wraps any object with the Smart Router's async shape.
- :class:`UpbitRouter` is a real Layer 1 over Upbit's public REST API.
"""

from mds.layer1.connector import Layer1Answer, SmartRouterConnector
from mds.layer1.router import DEFAULT_BASE_URL, UpbitRouter

__all__ = ["DEFAULT_BASE_URL", "Layer1Answer", "SmartRouterConnector", "UpbitRouter"]
