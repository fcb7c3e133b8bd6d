"""``python -m localcloud``: run the local Vertex AI API server until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from localcloud.config import ServerConfig, StateDirBusy, lock_state_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m localcloud", description=__doc__)
    p.add_argument("--config", help="YAML settings (images -> local commands, limits)")
    p.add_argument("--state-dir", help="database, logs, server.json (default .state/localcloud)")
    p.add_argument("--host", help="listen address (default 127.0.0.1: nothing here is authenticated)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (VERTEX_AI_EMULATOR_HOST); 0 picks a free one")
    p.add_argument("--http-port", type=int, help="REST/admin port (default gRPC port + 1); 0 picks a free one")
    p.add_argument("--storage-emulator-host", help="GCS endpoint handed to containers (STORAGE_EMULATOR_HOST)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServerConfig.load(a.config, state_dir=a.state_dir, host=a.host, grpc_port=a.grpc_port,
                            http_port=a.http_port, storage_emulator_host=a.storage_emulator_host)
    if a.http_port is None and a.grpc_port:
        cfg.http_port = a.grpc_port + 1
    try:  # before the (slow) imports of the API types: a second server is refused at once
        lock_file = lock_state_dir(cfg.state_dir)
    except StateDirBusy as e:
        print(f"localcloud: {e}", file=sys.stderr)
        return 3
    from localcloud.server import LocalCloud

    server = LocalCloud(cfg, lock_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    logging.getLogger("localcloud").info("stopping: cancelling running jobs, stopping deployed models")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
