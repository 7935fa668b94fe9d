"""Shared helpers: run the real daemon in-process on 127.0.0.1 with an ephemeral port."""
from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from pathlib import Path

import aiohttp

from appliance.runtime.config import ModelSettings, RuntimeConfig
from appliance.runtime.server import Server


def config(model_dir: Path, **settings) -> RuntimeConfig:
    top = {k: settings.pop(k) for k in list(settings) if k in ("max_body_bytes", "reload_interval_s")}
    return RuntimeConfig(model_dir=Path(model_dir), host="127.0.0.1", port=0,
                         board_json=Path("/nonexistent"), reload_interval_s=top.get("reload_interval_s", 0),
                         max_body_bytes=top.get("max_body_bytes", 1 << 20),
                         defaults=replace(ModelSettings(), **settings)).validate()


@contextlib.asynccontextmanager
async def serving(cfg: RuntimeConfig):
    server = Server(cfg)
    await server.start()
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}",
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield server, session
    finally:
        await server.stop()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total
