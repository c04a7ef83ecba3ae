"""`trimserve serve` as a real process: a tiny random Llama saved as a variant, on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.tiny_models import tiny_llama
from variants.format import BaseModelRef, VariantManifest
from variants.write import save_variant

CONTEXT = 4096  # long enough for a stream to outlive a short shutdown timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`trimserve serve` on a free port; its combined output is kept for assertions."""

    def __init__(self, variant: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "trimserve.cli", "serve", "--model", f"full={variant}"]
        command += ["--port", str(self.port), "--max-tokens", str(CONTEXT - 64), *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"trimserve serve exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"trimserve serve not ready: {self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def save_long_context_variant(out: Path, tokenizer) -> Path:
    """A tiny random Llama with a long context, saved as a variant (streams can run for seconds)."""
    model = tiny_llama(layers=2)
    model.config.max_position_embeddings = CONTEXT
    save_variant(model, tokenizer, out, VariantManifest(name="tiny", base=BaseModelRef(source="random"), method="none"))
    return out
