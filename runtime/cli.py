"""`appliance-agent runtime ...`: the inference daemon's command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, RuntimeConfig, big_cores, from_mapping, load_file

PROG = "appliance-agent runtime"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="On-device TFLite inference daemon")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the models over HTTP")
    s.add_argument("--config", type=Path, help="TOML or JSON file (flags override it)")
    s.add_argument("--model-dir", type=Path)
    s.add_argument("--store-dir", type=Path, help="secure model store (appliance.secure), searched first")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--board-json", type=Path,
                   default=Path(os.environ.get("APPLIANCE_BOARD_JSON", "/etc/appliance/board.json")))
    s.add_argument("--max-batch", type=int)
    s.add_argument("--max-wait-ms", type=float)
    s.add_argument("--queue-size", type=int)
    s.add_argument("--timeout-s", type=float)
    s.add_argument("--pool-size", type=int)
    s.add_argument("--num-threads", type=int)
    s.add_argument("--batching", choices=("auto", "on", "off"))
    s.add_argument("--no-inline", dest="inline_when_idle", action="store_const", const=False,
                   help="always invoke on a worker thread, even when the daemon is otherwise idle")
    s.add_argument("--reload-interval-s", type=float)
    s.add_argument("--max-body-bytes", type=int)
    s.add_argument("--no-affinity", action="store_true", help="do not pin to the board's big cores")
    s.add_argument("--port-file", help="write the bound port here (useful with --port 0)")
    s.add_argument("--log-level", default="INFO")
    return ap


def build_config(a: argparse.Namespace) -> RuntimeConfig:
    cfg = RuntimeConfig()
    if a.config:
        cfg = from_mapping(load_file(a.config), cfg, where=str(a.config))
    top = {k: v for k, v in {
        "model_dir": a.model_dir, "store_dir": a.store_dir, "host": a.host, "port": a.port,
        "board_json": a.board_json, "reload_interval_s": a.reload_interval_s,
        "max_body_bytes": a.max_body_bytes}.items() if v is not None}
    defaults = {k: v for k, v in {
        "max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms, "queue_size": a.queue_size,
        "timeout_s": a.timeout_s, "pool_size": a.pool_size, "num_threads": a.num_threads,
        "batching": a.batching, "inline_when_idle": a.inline_when_idle}.items()
        if v is not None}
    raw = {k: str(v) if isinstance(v, Path) else v for k, v in top.items()}
    if defaults:
        raw["defaults"] = defaults
    return from_mapping(raw, cfg, where="flags")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="appliance-runtime: %(levelname)s %(message)s")
    try:
        cfg = build_config(a)
        if not cfg.model_dir.is_dir() and cfg.store_dir is None:
            raise ConfigError(f"model_dir {cfg.model_dir}: not a directory (create it or pass --model-dir)")
        if not a.no_affinity:
            cores = big_cores(cfg.board_json)
            if cores:
                # Before any thread exists, so every worker and TFLite thread inherits it.
                try:
                    os.sched_setaffinity(0, cores)
                    logging.getLogger("appliance.runtime").info("pinned to big cores %s", cores)
                except OSError as e:  # e.g. a seccomp filter: run unpinned rather than not at all
                    logging.getLogger("appliance.runtime").warning("cannot pin to cores %s: %s", cores, e.strerror)
        from .server import serve  # aiohttp + numpy only once the config is valid
        return asyncio.run(serve(cfg, port_file=a.port_file))
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. port in use
        print(f"{PROG}: error: {e.strerror or e} ({getattr(e, 'filename', None) or 'socket'})", file=sys.stderr)
        return 1
