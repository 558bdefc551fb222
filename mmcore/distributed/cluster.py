"""LocalCluster: shard nodes as local processes, the single-machine way to use every core.

Examples
--------
>>> import tempfile
>>> from mmcore.model import default_model
>>> from mmcore.distributed import LocalCluster
>>> d = tempfile.mkdtemp(); _ = default_model().save(d + "/m")
>>> with LocalCluster(d + "/m", {"text": 1}, threads_per_node=1) as c:   # doctest: +SKIP
...     len(c.addresses["text"])
1
"""

from __future__ import annotations

import collections
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Mapping, Optional

from ..errors import ConfigError, NodeUnavailableError
from ..modality import Modality
from .config import DistributedConfig, ShardingStrategy
from .node import READY_PREFIX

__all__ = ["LocalCluster"]


class LocalCluster:
    """Start ``counts[m]`` nodes of each modality as subprocesses (``python -m mmcore node``).

    Parameters
    ----------
    model_dir : path-like
        The model directory every node loads (each only its modality's part).
    counts : dict of Modality or str -> int
        Nodes per modality.
    token : str, optional, keyword-only
        The cluster token; None: a fresh random one, written to a private token file.
    host : str, default "127.0.0.1", keyword-only
    threads_per_node : int, optional, keyword-only
        ``MMCORE_NUM_THREADS`` of each node (default: the library's default).
    start_timeout_s : float, default 120, keyword-only
        How long to wait for every node's ready line.
    env : dict, optional, keyword-only
        Extra environment variables of the nodes.

    The nodes start when the cluster is constructed (or entered); :meth:`stop` (or leaving the
    ``with`` block) sends SIGTERM, waits for them to drain, and kills what is left.

    Raises
    ------
    ConfigError
        Bad counts.
    NodeUnavailableError
        A node exited or did not become ready in time (its output is in the message).
    """

    def __init__(self, model_dir: Any, counts: Mapping[Any, int], *, token: Optional[str] = None,
                 host: str = "127.0.0.1", threads_per_node: Optional[int] = None,
                 start_timeout_s: float = 120.0, env: Optional[Mapping[str, str]] = None):
        if not isinstance(counts, Mapping) or not counts:
            raise ConfigError("[LocalCluster] counts must map modalities to node counts")
        self._counts: Dict[Modality, int] = {}
        for key, n in counts.items():
            m = Modality(key)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"[LocalCluster] counts[{str(m)!r}] must be an integer >= 1, "
                                  f"got {n!r}")
            self._counts[m] = n
        self.model_dir = os.path.abspath(os.fspath(model_dir))
        self.host = host
        self._tmp = tempfile.mkdtemp(prefix="mmcore-cluster-")
        self.token = token if token is not None else secrets.token_hex(32)
        self.token_file = os.path.join(self._tmp, "token")
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token)
        self._env = dict(os.environ)
        self._env.pop("MMCORE_CLUSTER_TOKEN", None)
        if threads_per_node is not None:
            self._env["MMCORE_NUM_THREADS"] = str(int(threads_per_node))
        self._env.update(env or {})
        self._start_timeout = float(start_timeout_s)
        self.processes: Dict[Modality, List[subprocess.Popen]] = {}
        self.addresses: Dict[str, List[str]] = {}
        #: the last lines each node printed, by process id
        self.output: Dict[int, Any] = {}
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def _spawn(self, m: Modality) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "mmcore", "node", "--model", self.model_dir,
               "--modality", str(m), "--host", self.host, "--port", "0",
               "--token-file", self.token_file]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self._env, cwd=self._tmp, text=True, bufsize=1)

    def start(self) -> None:
        """Start every node and wait for its ready line (no-op when running)."""
        if self.processes:
            return
        procs = [(m, self._spawn(m)) for m, n in self._counts.items() for _ in range(n)]
        deadline = time.monotonic() + self._start_timeout
        try:
            lines: Dict[int, "queue.Queue[Optional[str]]"] = {}
            for _, p in procs:
                # one reader per node from the start: its lines reach _wait_ready through a
                # queue (select() on the pipe misses lines already in the reader's buffer)
                lines[p.pid] = queue.Queue()
                threading.Thread(target=self._drain_output, args=(p, lines[p.pid]),
                                 daemon=True, name="mmcore-cluster-output").start()
            for m, p in procs:
                addr = self._wait_ready(p, lines[p.pid], deadline)
                self.processes.setdefault(m, []).append(p)
                self.addresses.setdefault(str(m), []).append(addr)
        except BaseException:
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
            self.processes = {}
            self.addresses = {}
            raise

    def _drain_output(self, p: subprocess.Popen,
                      lines: "Optional[queue.Queue[Optional[str]]]") -> None:
        """Keep reading a node's output (its last lines stay in :attr:`output`); the lines up
        to the ready line also go to ``lines``, then None at the end of the output."""
        log = self.output.setdefault(p.pid, collections.deque(maxlen=200))
        assert p.stdout is not None         # started with stdout=PIPE
        try:
            for line in p.stdout:
                log.append(line)
                if lines is not None:
                    lines.put(line)
                    if line.startswith(READY_PREFIX):
                        lines = None
        except (OSError, ValueError):
            pass
        finally:
            if lines is not None:
                lines.put(None)

    def _wait_ready(self, p: subprocess.Popen, lines: "queue.Queue[Optional[str]]",
                    deadline: float) -> str:
        seen: List[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeUnavailableError(
                    f"[LocalCluster] a node did not become ready in "
                    f"{self._start_timeout:.0f} s; its output: {''.join(seen)[-2000:]!r}")
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                if p.poll() is not None and lines.empty():
                    line = None        # exited, its output held open by another process
                else:
                    continue
            if line is None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                raise NodeUnavailableError(
                    f"[LocalCluster] a node exited with status {p.returncode}; its "
                    f"output: {''.join(seen)[-2000:]!r}")
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
            seen.append(line)

    def config(self, **kwargs: Any) -> DistributedConfig:
        """A :class:`DistributedConfig` for these nodes (keyword arguments override fields)."""
        kwargs.setdefault("token", self.token)
        return DistributedConfig(
            sharding_strategy=ShardingStrategy.modality_specific(
                {m: list(a) for m, a in self.addresses.items()}), **kwargs)

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """SIGTERM every node, wait up to ``timeout_s`` for them to drain, kill the rest."""
        procs = [p for ps in self.processes.values() for p in ps]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.processes = {}
        self.addresses = {}

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self.processes:
                self.stop(timeout_s=5)
        except Exception:
            pass
