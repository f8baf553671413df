#!/usr/bin/env python3
"""Checks compose.yml, the Dockerfile and docs/operations.md against the code, without Docker.

What it proves (each failure names the service and the rule):
  - every service of SPEC §2 is there, plus PostgreSQL, RabbitMQ and Redis;
  - every `depends_on` target exists, and has a healthcheck when the condition is
    service_healthy; every service has a healthcheck;
  - a service that talks to PostgreSQL, RabbitMQ, Redis or another service (by the host its URLs
    name) waits for it to be healthy;
  - every environment variable a service is given is one its crate's `src/config.rs` reads
    (`env = "..."`, also in the shared blocks it flattens: `#[command(flatten)]` of infra's
    `TokenConfig` and `HttpLimits`), or RUST_LOG, which infra's tracing set-up reads;
  - every variable with no default is given (JWT_SECRET), and so is every variable whose default
    names localhost, which is wrong inside a container (DATABASE_URL, AMQP_URL, ...);
  - JWT_SECRET is the same everywhere and compose refuses to start without it (`${JWT_SECRET:?}`);
  - URLs name a compose service, the right port, and the credentials and database that service
    is given;
  - LISTEN_ADDR's port is the published container port (beside METRICS_ADDR's, for the
    gateway's metrics listener) and the healthcheck's port, and the gateway's upstream URLs use
    each upstream's LISTEN_ADDR port;
  - each service runs a binary of the workspace that the Dockerfile builds (`cargo build
    --release --locked --bins`) and copies into the runtime image;
  - docs/operations.md's configuration table of each binary lists exactly the variables its
    config.rs (or the CLI's main.rs) reads, flattened blocks included, with the same defaults (a
    default named by a constant is compared with the constant's value).

Then, if a compose tool is at hand (`docker compose`, `docker-compose`, or COMPOSE_BIN), it runs
`config -q` for a schema check. Exit status 0 when every check passes, 1 otherwise.
Needs PyYAML (`python3 -m pip install pyyaml`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

try:
    import yaml
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("check-compose: PyYAML is missing: python3 -m pip install pyyaml")

ROOT = Path(__file__).resolve().parent.parent

# SPEC §2: the services and the crate whose config.rs each one reads.
RUST_SERVICES = {
    "gateway": "gateway",
    "command-api": "command-api",
    "projector": "projector",
    "fraud-worker": "fraud-worker",
}
INFRASTRUCTURE = ("postgres", "rabbitmq", "redis")

# Read outside config.rs: tracing's EnvFilter (infra/src/telemetry.rs), for every service.
COMMON_VARIABLES = {"RUST_LOG": ("infra/src/telemetry.rs", "EnvFilter::try_from_default_env")}

# A value to interpolate JWT_SECRET with when the shell has none (it is `:?`-required).
PLACEHOLDER_SECRET = "check-compose-placeholder-secret-0123456789"

ARG_FIELD = re.compile(
    r"#\[arg\((?P<attributes>.*?)\)\]\s*(?:pub\s+)?(?P<field>\w+)\s*:\s*(?P<type>[^,]+),", re.S
)

# docs/operations.md has one configuration table per binary, under these headings.
DOCUMENTED_BINARIES = {
    "gateway": "gateway/src/config.rs",
    "command-api": "command-api/src/config.rs",
    "projector": "projector/src/config.rs",
    "fraud-worker": "fraud-worker/src/config.rs",
    "ledger (CLI)": "ledger/src/main.rs",
}


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def check(self, condition: bool, message: str) -> bool:
        if condition:
            self.passed += 1
        else:
            self.failures.append(message)
        return condition


# Where the shared configuration blocks a Config flattens (`#[command(flatten)]`) are declared.
SHARED_SOURCES = ("infra/src",)

FLATTEN_FIELD = re.compile(r"#\[command\(flatten\)\]\s*(?:pub\s+)?\w+\s*:\s*(?:[\w:]+::)?(?P<type>\w+)\s*,")


def struct_body(text: str, name: str) -> str | None:
    """The text of `struct name { ... }` (up to the first line that is only `}`)."""
    match = re.search(rf"\bstruct\s+{name}\s*\{{(?P<body>.*?)^\}}", text, re.S | re.M)
    return match["body"] if match else None


def constant_value(name: str, sources: list[Path]) -> str | None:
    """The integer literal a `const NAME: T = 1_234;` names, in any of `sources`."""
    for source in sources:
        match = re.search(rf"\bconst\s+{name}\s*:\s*\w+\s*=\s*([0-9_]+)\s*;", source.read_text())
        if match:
            return match[1]
    return None


def parse_arg_fields(text: str, sources: list[Path]) -> dict[str, dict]:
    variables = {}
    for match in ARG_FIELD.finditer(text):
        attributes = match["attributes"]
        env = re.search(r'\benv\s*=\s*"([A-Z0-9_]+)"', attributes)
        if not env:
            continue
        default = re.search(r'\bdefault_value\s*=\s*"((?:[^"\\]|\\.)*)"', attributes)
        default_t = re.search(r"\bdefault_value(?:_t)?\s*=\s*([^,\"]+?)\s*(?:,|$)", attributes)
        value = default[1] if default else (default_t[1].strip() if default_t else None)
        if value is not None and re.fullmatch(r"(?:[\w]+::)*[A-Z][A-Z0-9_]*", value):
            # A named constant: compared by its value when it is a plain literal.
            value = constant_value(value.rsplit("::", 1)[-1], sources) or value
        variables[env[1]] = {
            "field": match["field"],
            "default": value,
            "optional": match["type"].strip().startswith("Option<"),
        }
    return variables


def read_config_variables(crate: str, path: str = "src/config.rs") -> dict[str, dict]:
    """The variables a crate's config.rs reads (flattened shared blocks included):
    name -> {default, optional, field}."""
    text = (ROOT / crate / path).read_text()
    shared = [source for folder in SHARED_SOURCES for source in sorted((ROOT / folder).rglob("*.rs"))]
    own = sorted((ROOT / crate / "src").rglob("*.rs"))
    sources = own + shared
    variables = parse_arg_fields(text, sources)
    for flattened in FLATTEN_FIELD.finditer(text):
        for source in own + shared:
            body = struct_body(source.read_text(), flattened["type"])
            if body is not None:
                variables.update(parse_arg_fields(body, sources))
                break
        else:
            raise SystemExit(f"check-compose: {crate}/{path} flattens {flattened['type']}, found neither in {crate}/src nor in {SHARED_SOURCES}")
    return variables


def documented_variables(text: str) -> dict[str, dict[str, str]]:
    """docs/operations.md's tables: heading -> {variable: default cell}."""
    tables: dict[str, dict[str, str]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = None
        elif line.startswith("### "):
            heading = line[4:].strip()
            if heading in DOCUMENTED_BINARIES:
                tables[heading] = {}
        elif heading in tables:
            row = re.match(r"\|\s*`([A-Z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", line)
            if row:
                tables[heading][row[1]] = row[2]
    return tables


def default_matches(cell: str, spec: dict) -> bool:
    """Whether a documented default cell says what the code does."""
    if spec["default"] is None:
        return cell.startswith("unset") if spec["optional"] else cell.startswith("**required**")
    code = spec["default"].replace("_", "") if re.fullmatch(r"[0-9_]+", spec["default"]) else spec["default"]
    if code == "":
        return cell == "empty"
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", code):  # a named constant: the doc describes it in words
        return not cell.startswith("`")
    return cell == f"`{code}`"


def check_runbook(checker: Checker) -> None:
    path = ROOT / "docs" / "operations.md"
    if not checker.check(path.exists(), "docs/operations.md is missing"):
        return
    tables = documented_variables(path.read_text())
    for heading, source in DOCUMENTED_BINARIES.items():
        crate, relative = source.split("/", 1)
        reads = read_config_variables(crate, relative)
        documented = tables.get(heading)
        if not checker.check(documented is not None, f"docs/operations.md: no table under '### {heading}'"):
            continue
        for variable in sorted(set(reads) - set(documented)):
            checker.failures.append(f"docs/operations.md ({heading}): {variable} is read by {source} but not documented")
        for variable in sorted(set(documented) - set(reads)):
            checker.failures.append(f"docs/operations.md ({heading}): {variable} is documented but {source} does not read it")
        for variable in sorted(set(reads) & set(documented)):
            spec = reads[variable]
            checker.check(
                default_matches(documented[variable], spec),
                f"docs/operations.md ({heading}): {variable}'s default is {documented[variable]!r}, "
                f"the code's is {spec['default']!r}{' (optional)' if spec['optional'] else ''}",
            )


def interpolate(value, environment: dict[str, str], missing: list[str]):
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `$$`."""
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, operator, argument = match["name"], match["operator"], match["argument"] or ""
        current = environment.get(name)
        if operator in (":-", "-"):
            unset = current is None or (operator == ":-" and current == "")
            return argument if unset else current
        if operator in (":?", "?"):
            if current is None or (operator == ":?" and current == ""):
                missing.append(f"{name}: {argument}")
                return ""
            return current
        return current or ""

    return re.sub(
        r"\$\$|\$\{(?P<name>\w+)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}", substitute, value
    )


def environment_of(service: dict) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = (entry.split("=", 1) for entry in environment)
        return {pair[0]: (pair[1] if len(pair) > 1 else None) for pair in pairs}
    return {name: (None if value is None else str(value)) for name, value in environment.items()}


def container_ports(service: dict) -> set[int]:
    ports = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def command_of(service: dict) -> list[str]:
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value:
            return value.split() if isinstance(value, str) else list(value)
    return []


def workspace_binaries() -> set[str]:
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    binaries = set()
    for member in manifest["workspace"]["members"]:
        crate = tomllib.loads((ROOT / member / "Cargo.toml").read_text())
        declared = [target["name"] for target in crate.get("bin", [])]
        if declared:
            binaries.update(declared)
        elif (ROOT / member / "src" / "main.rs").exists():
            binaries.add(crate["package"]["name"])
    return binaries


def check_dockerfile(checker: Checker, compose: dict, binaries: set[str]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    checker.check(
        re.search(r"cargo build --release --locked --bins\b", dockerfile) is not None,
        "Dockerfile: the builder must run `cargo build --release --locked --bins`",
    )
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\w+))?", dockerfile, re.M | re.I)
    checker.check(len(stages) >= 2, "Dockerfile: expected a builder and a runtime stage")
    for name in sorted(RUST_SERVICES):
        service = compose["services"].get(name) or {}
        command = command_of(service)
        binary = command[0] if command else None
        checker.check(
            binary in binaries,
            f"{name}: runs {binary!r}, which is not a binary of the workspace ({sorted(binaries)})",
        )
        checker.check(
            binary is not None and re.search(rf"target/release/{re.escape(binary)}\b", dockerfile),
            f"{name}: the Dockerfile does not copy target/release/{binary} into the image",
        )
        build = service.get("build") or {}
        context = build if isinstance(build, str) else build.get("context")
        checker.check(
            context == "." and (isinstance(build, str) or build.get("dockerfile", "Dockerfile") == "Dockerfile"),
            f"{name}: must be built from the root Dockerfile (build: context '.')",
        )
    for tool in ("curl", "wget"):
        if re.search(rf"apt-get install[^\n]*\b{tool}\b", dockerfile):
            break
    else:
        checker.failures.append("Dockerfile: the runtime stage needs curl or wget for health checks")
    ignored = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    for entry in ("target/", "logs/", ".git/"):
        checker.check(
            entry in ignored or entry.rstrip("/") in ignored,
            f".dockerignore: {entry} must be ignored",
        )


def host_port(url: str, default_port: int) -> tuple[str | None, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port or default_port


def check_service_environment(
    checker: Checker, name: str, given: dict[str, str], reads: dict[str, dict]
) -> None:
    for variable in sorted(given):
        known = variable in reads or variable in COMMON_VARIABLES
        checker.check(
            known,
            f"{name}: is given {variable}, which {RUST_SERVICES[name]}/src/config.rs does not read",
        )
    for variable, spec in sorted(reads.items()):
        needed = spec["default"] is None and not spec["optional"]
        local_default = spec["default"] is not None and re.search(
            r"localhost|127\.0\.0\.1", spec["default"]
        )
        if needed or local_default:
            why = "it has no default" if needed else f"its default {spec['default']} is not reachable in a container"
            checker.check(
                bool(given.get(variable)), f"{name}: must be given {variable} ({why})"
            )


def check_urls(
    checker: Checker, name: str, given: dict[str, str], services: dict, resolved: dict
) -> set[str]:
    """Checks the connection URLs; returns the compose services they name."""
    targets = set()
    database_url = given.get("DATABASE_URL") or given.get("READ_DATABASE_URL")
    if database_url:
        host, port = host_port(database_url, 5432)
        targets.add(host)
        postgres = resolved.get(host, {})
        parts = urlsplit(database_url)
        checker.check(host == "postgres" and port == 5432, f"{name}: DATABASE_URL must name postgres:5432")
        checker.check(
            parts.username == postgres.get("POSTGRES_USER", "postgres")
            and parts.password == postgres.get("POSTGRES_PASSWORD")
            and parts.path.lstrip("/") == postgres.get("POSTGRES_DB"),
            f"{name}: DATABASE_URL's user, password and database must be postgres's POSTGRES_*",
        )
    if "AMQP_URL" in given:
        host, port = host_port(given["AMQP_URL"], 5672)
        targets.add(host)
        rabbitmq = resolved.get(host, {})
        parts = urlsplit(given["AMQP_URL"])
        checker.check(host == "rabbitmq" and port == 5672, f"{name}: AMQP_URL must name rabbitmq:5672")
        checker.check(
            parts.username == rabbitmq.get("RABBITMQ_DEFAULT_USER", "guest")
            and parts.password == rabbitmq.get("RABBITMQ_DEFAULT_PASS", "guest"),
            f"{name}: AMQP_URL's credentials must be rabbitmq's RABBITMQ_DEFAULT_USER/PASS",
        )
    if "REDIS_URL" in given:
        host, port = host_port(given["REDIS_URL"], 6379)
        targets.add(host)
        checker.check(host == "redis" and port == 6379, f"{name}: REDIS_URL must name redis:6379")
    for variable, upstream in (
        ("COMMAND_API_URL", "command-api"),
        ("QUERY_API_URL", "projector"),
        ("FRAUD_WORKER_URL", "fraud-worker"),
    ):
        if variable in given:
            host, port = host_port(given[variable], 80)
            targets.add(host)
            upstream_port = listen_port(resolved.get(upstream, {}), upstream)
            checker.check(
                host == upstream and port == upstream_port,
                f"{name}: {variable} is {given[variable]}; expected http://{upstream}:{upstream_port}",
            )
    for target in targets:
        checker.check(target in services, f"{name}: a URL names {target!r}, which is not a compose service")
    return targets


DEFAULT_PORTS: dict[str, int] = {}


def listen_port(given: dict[str, str], name: str) -> int | None:
    address = given.get("LISTEN_ADDR") or DEFAULT_PORTS.get(name)
    if address is None:
        return None
    return int(str(address).rsplit(":", 1)[-1])


def healthcheck_ports(service: dict) -> set[int]:
    test = (service.get("healthcheck") or {}).get("test") or []
    text = " ".join(test) if isinstance(test, list) else str(test)
    return {int(port) for port in re.findall(r"https?://[^/:\s]+:(\d+)/health", text)}


def check_dependencies(checker: Checker, services: dict) -> None:
    for name, service in sorted(services.items()):
        checker.check(bool(service.get("healthcheck")), f"{name}: has no healthcheck")
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, rule in depends_on.items():
            if not checker.check(target in services, f"{name}: depends on {target!r}, which does not exist"):
                continue
            if (rule or {}).get("condition") == "service_healthy":
                checker.check(
                    bool(services[target].get("healthcheck")),
                    f"{name}: waits for {target} to be healthy, but {target} has no healthcheck",
                )


def waits_healthy(service: dict, target: str) -> bool:
    depends_on = service.get("depends_on") or {}
    return isinstance(depends_on, dict) and (depends_on.get(target) or {}).get("condition") == "service_healthy"


def run_compose_tool(checker: Checker, environment: dict[str, str]) -> None:
    override = os.environ.get("COMPOSE_BIN")
    if override:
        tool = override.split()
    elif shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True
    ).returncode == 0:
        tool = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        tool = ["docker-compose"]
    else:
        print("  (no docker compose / docker-compose here: the schema check is skipped)")
        return
    compose_file = ROOT / "compose.yml"
    note = ""
    version = subprocess.run([*tool, "version"], capture_output=True, text=True).stdout
    if re.search(r"docker-compose version 1\.", version):
        # The v1 tool's schema predates the top-level `name` of the Compose Specification;
        # everything else is checked as written.
        document = yaml.safe_load(compose_file.read_text())
        document.pop("name", None)
        scratch = tempfile.NamedTemporaryFile("w", suffix=".yml", dir=ROOT, delete=False)
        with scratch:
            yaml.safe_dump(document, scratch)
        compose_file = Path(scratch.name)
        note = " (v1 schema: checked without the top-level `name`)"
    try:
        result = subprocess.run(
            [*tool, "-f", str(compose_file), "config", "-q"],
            capture_output=True,
            text=True,
            env=environment,
        )
    finally:
        if note:
            compose_file.unlink()
    checker.check(
        result.returncode == 0,
        f"{' '.join(tool)} config: {result.stderr.strip() or result.stdout.strip()}",
    )
    if result.returncode == 0:
        print(f"  {' '.join(tool)} config -q: compose.yml is valid{note}")


def main() -> int:
    checker = Checker()
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    services: dict = compose.get("services") or {}

    environment = dict(os.environ)
    environment.setdefault("JWT_SECRET", PLACEHOLDER_SECRET)
    missing: list[str] = []
    resolved = {
        name: {variable: interpolate(value, environment, missing) for variable, value in environment_of(service).items()}
        for name, service in services.items()
    }
    checker.check(not missing, f"compose.yml: unresolved required variables: {missing}")

    for name in (*RUST_SERVICES, *INFRASTRUCTURE):
        checker.check(name in services, f"compose.yml: the service {name!r} is missing")

    check_dependencies(checker, services)
    check_dockerfile(checker, compose, workspace_binaries())

    reads_by_service = {name: read_config_variables(crate) for name, crate in RUST_SERVICES.items()}
    for name, reads in reads_by_service.items():
        if "LISTEN_ADDR" in reads:
            DEFAULT_PORTS[name] = reads["LISTEN_ADDR"]["default"]
    for variable, (path, marker) in COMMON_VARIABLES.items():
        checker.check(marker in (ROOT / path).read_text(), f"{variable}: {path} no longer reads it ({marker})")

    secrets = set()
    for name in sorted(RUST_SERVICES):
        if name not in services:
            continue
        service = services[name]
        raw = environment_of(service)
        given = {variable: value for variable, value in resolved[name].items() if value is not None}
        reads = reads_by_service[name]
        check_service_environment(checker, name, {**given, **{v: "" for v in raw if v not in given}}, reads)
        if "JWT_SECRET" in reads:
            secrets.add(raw.get("JWT_SECRET"))
            checker.check(
                re.fullmatch(r"\$\{JWT_SECRET:\?[^}]+\}", raw.get("JWT_SECRET") or "") is not None,
                f"{name}: JWT_SECRET must be `${{JWT_SECRET:?message}}` (required, never defaulted)",
            )
        port = listen_port(given, name)
        metrics = given.get("METRICS_ADDR")
        metrics_port = int(str(metrics).rsplit(":", 1)[-1]) if metrics else None
        checker.check(
            not service.get("ports") or container_ports(service) - {metrics_port} == {port},
            f"{name}: publishes container ports {sorted(container_ports(service))}, but listens on {port}"
            + (f" (and {metrics_port} for metrics)" if metrics_port else ""),
        )
        checker.check(
            healthcheck_ports(service) == {port},
            f"{name}: the healthcheck must GET http://127.0.0.1:{port}/health (LISTEN_ADDR)",
        )
        for target in check_urls(checker, name, given, services, resolved):
            if target in services:
                checker.check(
                    waits_healthy(service, target),
                    f"{name}: talks to {target} but does not wait for it (depends_on condition: service_healthy)",
                )
    checker.check(len(secrets) == 1, f"JWT_SECRET differs between services: {sorted(map(str, secrets))}")
    checker.check(
        bool(services.get("gateway", {}).get("ports")), "gateway: its port must be published (the public API)"
    )

    check_runbook(checker)
    run_compose_tool(checker, environment)

    if checker.failures:
        for failure in checker.failures:
            print(f"FAIL {failure}", file=sys.stderr)
        print(f"check-compose: {len(checker.failures)} failed, {checker.passed} passed", file=sys.stderr)
        return 1
    print(f"check-compose: compose.yml, the Dockerfile and docs/operations.md agree with the code ({checker.passed} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
