"""A render farm on this machine, from real parts, for the chaos run and farm benchmarks.

Its own PostgreSQL cluster (``initdb`` on a free port, so restarting it disturbs nothing
else) holds the Prefect server's database and the job database; SeaweedFS serves S3; a
Prefect server runs on that PostgreSQL; ``emo deploy --farm`` registers the deployments; and
``emo worker`` processes serve the process pools, as on a few workstations (the README's "A
render farm on a few workstations"). Every part can be stopped, killed and started again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.services import WeedServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def _pg_bin() -> Path:
    """The directory of the installed PostgreSQL server programs (initdb, pg_ctl)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise SystemExit("PostgreSQL server programs (initdb, pg_ctl) are not installed")
    return versions[-1].parent


@dataclass
class PgCluster:
    """A throwaway PostgreSQL cluster (trust auth) on 127.0.0.1:``port``."""

    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / "pgdata"

    def _run(self, program: str, *args: str) -> None:
        command = [str(_pg_bin() / program), *args]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        # Output to a file, not a pipe: the server pg_ctl starts would hold a pipe open.
        log = self.root / "pg_ctl.log"
        with open(log, "ab") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed; see {log}")

    def init(self) -> None:
        self.data.mkdir(parents=True)
        if os.geteuid() == 0:
            for path in (self.root, self.data):
                shutil.chown(path, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _options(self) -> str:
        return f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start(self) -> None:
        log = str(self.data / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-o", self._options(), "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-o", self._options(), "restart"
        )

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def url(self, database: str, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"


@dataclass
class PrefectServer:
    """``prefect server start`` on PostgreSQL; restartable on the same port and database."""

    home: Path
    database_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    lease_storage: str = "prefect.server.concurrency.lease_storage.filesystem"
    # Basic auth as in k8s (create-secrets.sh): the server requires it, every client sends it.
    auth_string: str = field(default_factory=lambda: f"farm:{uuid.uuid4().hex}")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def requires_auth(self) -> bool:
        """True if the API refuses a request without the auth string and takes one with it."""
        import httpx

        url, body = f"{self.api}/flows/filter", {"limit": 1}
        refused = httpx.post(url, json=body, timeout=10).status_code == 401
        user, _, password = self.auth_string.partition(":")
        taken = httpx.post(url, json=body, auth=(user, password), timeout=10).status_code == 200
        return refused and taken

    def start(self, timeout: float = 180) -> None:
        import httpx

        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            # Concurrency leases on disk (PREFECT_HOME), so a restart keeps them (README).
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": self.lease_storage,
            "PREFECT_SERVER_API_AUTH_STRING": self.auth_string,
        }
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start; see {self.home}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@dataclass
class Farm:
    """The parts, the environment every process of the farm shares, and its workers."""

    root: Path
    env: dict[str, str]
    pg: PgCluster
    weed: WeedServer
    prefect: PrefectServer
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    pools: dict[str, tuple[str, int]] = field(default_factory=dict)  # worker -> (pool, limit)

    def start_worker(self, name: str, pool: str | None = None, limit: int | None = None) -> None:
        """Start (or start again) the worker ``name`` of ``pool`` with ``limit`` runs."""
        pool, limit = (pool, limit) if pool else self.pools[name]
        self.pools[name] = (pool, limit)
        log = open(self.root / f"worker-{name}.log", "ab")  # noqa: SIM115
        self.workers[name] = subprocess.Popen(
            [str(BIN / "emo"), "worker", "--pool", pool, "--limit", str(limit), "--name", name],
            env={**self.env, "EMO_HOME": str(self.root / f"home-{name}")},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def emo(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """An `emo` command from another shell on the farm."""
        return subprocess.run(
            [str(BIN / "emo"), *args],
            env={**self.env, "EMO_HOME": str(self.root / "home-shell")},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.terminate()
        for process in self.workers.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in flow_run_pids():  # runs the workers started and left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.prefect.stop()
        self.weed.stop()
        with contextlib.suppress(RuntimeError):
            self.pg.stop()


def flow_run_pids(api: str | None = None) -> dict[int, str]:
    """Processes of this machine running a Prefect flow run (pid -> flow run id); only those
    of the Prefect API ``api`` when given."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        variables = dict(
            item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
        )
        run_id = variables.get("PREFECT__FLOW_RUN_ID")
        if run_id and (api is None or variables.get("PREFECT_API_URL") == api):
            found[int(entry.name)] = run_id
    return found


def tiny_weights(path: Path) -> Path:
    """A tiny random bundle in the real format (the renders test orchestration, not quality)."""
    from emo.bundle import save_bundle
    from emo.models.components import build_components
    from emo.models.config import TINY

    save_bundle(build_components(TINY, seed=0), TINY, path)
    return path


def start_farm(
    root: Path,
    *,
    gpu_workers: int = 2,
    gpu_runs: int = 1,
    settings: dict[str, str] | None = None,
    project: Path = ROOT,
) -> Farm:
    """Bring the whole farm up under ``root``: databases, S3, Prefect, deployments, workers.

    ``gpu_workers`` GPU workers (and as many GPU slots), each taking ``gpu_runs`` runs at once;
    ``project``: the checkout the deployments run (this one by default)."""
    pg = PgCluster(root / "pg")
    pg.init()
    pg.start()
    prefect_db = pg.create_database("prefect")
    jobs_db = pg.create_database("emo")
    weed = WeedServer(root / "weed")
    weed.start()
    store = weed.s3_store(bucket="farm")
    store.ensure_bucket()
    prefect = PrefectServer(root / "prefect", prefect_db.replace("+psycopg", "+asyncpg"))
    prefect.start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EMO_", "PREFECT_"))},
        "PREFECT_API_URL": prefect.api,
        "PREFECT_API_AUTH_STRING": prefect.auth_string,
        "EMO_DATABASE_URL": jobs_db,
        "EMO_STORE_URL": "s3://farm/studio",
        "EMO_S3_ENDPOINT": weed.endpoint,
        "EMO_S3_ACCESS_KEY": weed.access_key,
        "EMO_S3_SECRET_KEY": weed.secret_key,
        "EMO_S3_SECURE": "false",
        "EMO_WEIGHTS": str(tiny_weights(root / "weights")),
        "EMO_GPU_SLOTS": str(gpu_workers),
        "EMO_DISPATCH": "deployment",  # every process of the farm dispatches to the farm
        **(settings or {}),
    }
    farm = Farm(root=root, env=env, pg=pg, weed=weed, prefect=prefect)
    for command in (["db", "upgrade"], ["deploy", "--farm", "--project", str(project)]):
        done = farm.emo(*command)
        if done.returncode != 0:
            farm.stop()
            raise RuntimeError(f"emo {' '.join(command)} failed: {done.stdout}{done.stderr}")
    for index in range(gpu_workers):
        farm.start_worker(f"gpu-{index}", "gpu-local", gpu_runs)
    farm.start_worker("cpu-0", "cpu-local", 4)
    return farm


def speech(seconds: float, seed: int):
    """Synthetic speech: a voiced tone under a syllable-rate envelope (16 kHz, float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    rate = 2.0 + rng.random() * 2
    envelope = np.abs(np.sin(2 * np.pi * rate * t))
    return (0.3 * envelope * np.sin(2 * np.pi * (140 + 60 * rng.random()) * t)).astype(np.float32)


def speech_manifest(
    root: Path, name: str, jobs: dict[str, float], *, steps: int, seed: int
) -> Path:
    """The manifest ``root/<name>.yaml`` of batch ``name``: one job per entry of ``jobs`` (job
    name -> seconds of synthetic speech, written beside it), over the demo portrait."""
    import yaml

    from tests.conftest import write_wav

    entries = []
    for index, (job, seconds) in enumerate(jobs.items()):
        audio = root / f"{job}.wav"
        write_wav(audio, speech(seconds, seed * 100 + index))
        entries.append(
            {
                "name": job,
                "image": str(ROOT / "emo" / "assets" / "demo_portrait.png"),
                "audio": str(audio),
                "face_box": [0.2, 0.15, 0.8, 0.85],
                "steps": steps,
                "seed": 1000 + index,
            }
        )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "jobs": entries}))
    return path
