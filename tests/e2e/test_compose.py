"""compose.yaml runs the same entry points, with the same flags, as coldswarm-local."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from coldswarm.coordinator import local_cluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def flag_names(argv):
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_coordinator_service_matches_local_cluster(compose):
    command = compose["services"]["coordinator"]["command"]
    defaults = local_cluster.LocalClusterConfig()
    local = local_cluster.coordinator_command(
        Path("/d"), "h:1", "/ip4/0.0.0.0/tcp/1", Path("/d/j"), defaults.evaluator, defaults.method, "h:2"
    )
    assert command[:2] == local[:2] == ["coldswarm-coordinator", "serve"]
    assert flag_names(command) == flag_names(local)
    # The same evaluator and merge method, so versions made under compose carry the same metrics.
    values = lambda argv: {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--")}  # noqa: E731
    for flag in ("--evaluator", "--default-method"):
        assert values(command)[flag] == values(local)[flag]


def test_worker_service_matches_local_cluster(compose):
    command = compose["services"]["worker"]["command"]
    local = local_cluster.worker_command("h:1", Path("/t"), Path("/w"), "cpu")
    assert command[0] == local[0] == "join-swarm"
    assert flag_names(command) == flag_names(local)


def test_compose_commands_parse_with_the_real_entry_points(compose):
    from coldswarm.coordinator import admin_cli, cli
    from coldswarm.worker import cli as worker_cli

    cli.build_parser().parse_args(compose["services"]["coordinator"]["command"][1:])
    worker_cli.build_parser().parse_args(compose["services"]["worker"]["command"][1:])
    admin = compose["services"]["admin"]
    admin_cli.build_parser().parse_args(admin["entrypoint"][1:] + admin["command"])
    health = compose["services"]["coordinator"]["healthcheck"]["test"]
    assert health[:3] == ["CMD", "coldswarm-coordinator", "health"]
    cli.build_parser().parse_args(health[2:])


def test_worker_service_is_scalable(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker, (
        "--scale needs no fixed names or host ports"
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO / "compose.yaml"), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def uncommented_prometheus(text: str) -> str:
    """compose.yaml with its commented-out prometheus service put back."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        if line.startswith("  # prometheus:"):
            inside = True
        if inside and line.startswith("  #"):
            line = "  " + line[4:]
        elif inside:
            inside = False
        out.append(line)
    return "\n".join(out) + "\n"


def test_the_commented_prometheus_service_scrapes_the_coordinators_status_port(compose, tmp_path):
    full = yaml.safe_load(uncommented_prometheus((REPO / "compose.yaml").read_text()))
    prometheus = full["services"]["prometheus"]
    mount = prometheus["volumes"][0].split(":")
    assert mount[1] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / mount[0]).read_text())
    target = config["scrape_configs"][0]["static_configs"][0]["targets"][0]
    listen = next(a for a in compose["services"]["coordinator"]["command"] if a.startswith("--http-listen="))
    assert target == "coordinator:" + listen.rsplit(":", 1)[1]
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed: validated the YAML only")
    path = tmp_path / "compose.yaml"
    path.write_text(uncommented_prometheus((REPO / "compose.yaml").read_text()))
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "prometheus.yml", tmp_path / "docs" / "prometheus.yml")
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    result = subprocess.run(
        ["docker-compose", "-f", str(path), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_image_copies_every_installed_folder():
    # The image installs the project from the folders it copies: one that pyproject maps but the
    # Dockerfile does not copy makes `docker compose build` fail (it did once, after common/ and swarm/).
    import tomllib

    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {
        line.split()[1]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and len(line.split()) == 3
    }
    missing = sorted({folder.split("/")[0] for folder in package_dir.values()} - copied)
    assert not missing, f"the Dockerfile does not COPY {missing}"
