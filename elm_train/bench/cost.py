"""The cost model: a price table per device type, the device in use, Token/$ and Loss/$.

Token/$ = tokens/s x 3600 / price per hour (docs/reference.md section 4's Token/Second over
Dollar/Second). Loss/$ = Loss/Token x Token/s / (Dollar/s), with Loss/Token measured as the
loss a fixed token budget removed, divided by that budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from elm_spec import ElmError

DEFAULT_PRICES = Path(__file__).parent / "prices.yaml"
UNITS = ("relative", "usd")
CPU = "cpu"


@dataclass(frozen=True)
class PriceTable:
    source: str
    unit: str
    prices: dict[str, float]              # device type -> price of one device-hour
    patterns: dict[str, tuple[str, ...]]  # device type -> regexes for the CUDA device name

    def price_per_hour(self, device_type: str) -> float:
        if device_type not in self.prices:
            raise ElmError(f"{self.source}: no price for device {device_type!r}; known: "
                           f"{', '.join(self.prices)}")
        return self.prices[device_type]

    def device_type(self, device_name: str) -> str:
        """The table's name for a CUDA device, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100-80GB'."""
        for name, patterns in self.patterns.items():
            if any(re.search(p, device_name, re.IGNORECASE) for p in patterns):
                return name
        raise ElmError(f"{self.source}: no entry matches the device {device_name!r}; add one "
                       "(price_per_hour and a `match` pattern) or pass --gpu-type NAME")



def currency(units: set[str]) -> str:
    """What Token/$ counts tokens per, for rows priced in these units."""
    if units == {"relative"}:
        return "A100-40GB-hour"
    return "USD" if units == {"usd"} else "price unit (mixed price tables)"


def load_prices(path: Path | None = None) -> PriceTable:
    path = path or DEFAULT_PRICES
    if not path.is_file():
        raise ElmError(f"{path}: price table not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ElmError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict) or not data["devices"]:
        raise ElmError(f"{path}: expected `unit` and a non-empty `devices` mapping")
    unit = data.get("unit", "relative")
    if unit not in UNITS:
        raise ElmError(f"{path}: unit: {unit!r} is not one of {', '.join(UNITS)}")
    prices, patterns = {}, {}
    for name, entry in data["devices"].items():
        where = f"{path}: devices.{name}"
        if not isinstance(entry, dict):
            raise ElmError(f"{where}: expected a mapping with price_per_hour and match")
        unknown = set(entry) - {"price_per_hour", "match"}
        if unknown:
            raise ElmError(f"{where}.{sorted(unknown)[0]}: unknown key; expected price_per_hour, match")
        price = entry.get("price_per_hour")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or price <= 0:
            raise ElmError(f"{where}.price_per_hour: must be a positive number, got {price!r}")
        match = entry.get("match") or []
        if not isinstance(match, list) or not all(isinstance(p, str) for p in match):
            raise ElmError(f"{where}.match: expected a list of regular expressions")
        for pattern in match:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ElmError(f"{where}.match: {pattern!r} is not a regular expression ({error})") from None
        prices[str(name)] = float(price)
        patterns[str(name)] = tuple(match)
    return PriceTable(str(path), unit, prices, patterns)


@dataclass(frozen=True)
class Device:
    kind: str         # "cuda" or "cpu"
    name: str         # torch.cuda.get_device_name(0), or the CPU model
    count: int        # CUDA devices on this node (0 on the CPU)
    memory_bytes: int | None = None  # memory of one CUDA device


def detect_device() -> Device:
    import platform

    import torch

    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_name(0), torch.cuda.device_count(),
                      torch.cuda.get_device_properties(0).total_memory)
    return Device("cpu", platform.processor() or platform.machine(), 0)


def device_type_for(device: Device, table: PriceTable, override: str | None = None) -> str:
    """The price-table entry for the running device (`override` names one directly)."""
    if override is not None:
        table.price_per_hour(override)
        return override
    if device.kind == "cpu":
        table.price_per_hour(CPU)
        return CPU
    return table.device_type(device.name)


def tokens_per_dollar(tokens_per_s: float, price_per_hour: float) -> float:
    return tokens_per_s * 3600.0 / price_per_hour


def cost_of_tokens(tokens: float, tokens_per_s: float, price_per_hour: float) -> float:
    """What training `tokens` costs at this throughput and price (the table's currency)."""
    return tokens / tokens_per_dollar(tokens_per_s, price_per_hour)


def loss_per_dollar(loss_per_token: float, tokens_per_s: float, price_per_hour: float) -> float:
    return loss_per_token * tokens_per_dollar(tokens_per_s, price_per_hour)
