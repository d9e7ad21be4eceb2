"""Workload-policy decision time: CreateContainer and ExecProcess on a 10-container policy.

Each decision goes through :class:`coffer.policy.engine.PolicyEngine` on the thread that created it
(the engine's own thread), as the agent decides a request: the request's view built and loaded,
the rules' fast path evaluated by the regorus RVM (the request rule, in the interpreter, for what
it does not allow), the result checked and state ops applied. Every CreateContainer uses
a fresh container id (and is followed, untimed, by RemoveContainer so the state stays the same
size). Target: median <= 50 us.

Usage: python bench/policy.py [--count N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from coffer.policy import requests as rq
from coffer.policy.engine import PolicyEngine
from coffer.policy.model import ContainerPolicy, EnvRule, HostAccess, Mount, User, WorkloadPolicy

TARGET_US = 50.0


def _policy() -> tuple[WorkloadPolicy, dict[str, rq.ContainerSpec]]:
    containers = []
    specs = {}
    for i in range(10):
        name = f"app{i}"
        image = f"registry.example/team/{name}@sha256:{i:064x}"
        env = (
            EnvRule(name="PATH", value="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"),
            EnvRule(name="APP_MODE", value="production"),
            EnvRule(name="HOSTNAME", pattern="[a-z0-9-]+"),
        )
        containers.append(
            ContainerPolicy(
                name=name,
                image=image,
                args=(f"/usr/bin/{name}", "--config", "/etc/app/config.yaml"),
                env=env,
                user=User(uid=1000 + i, gid=1000),
                capabilities=rq.DEFAULT_CAPABILITIES,
                no_new_privileges=True,
                mounts=(
                    Mount(
                        destination="/etc/app",
                        source=f"configmap:{name}-config",
                        options=("rbind", "rprivate", "ro"),
                    ),
                ),
                allow=HostAccess(exec=((f"/usr/bin/{name}", "--health"),), logs=True),
            )
        )
        specs[name] = rq.ContainerSpec(
            name=name,
            image=image,
            args=containers[-1].args,
            env=(env[0], env[1], EnvRule(name="HOSTNAME", value=f"web-{i}")),
            user=User(uid=1000 + i, gid=1000),
            no_new_privileges=True,
            mounts=(
                rq.VolumeMount(
                    destination="/etc/app", kind="configmap", source=f"{name}-config", read_only=True
                ),
            ),
        )
    return WorkloadPolicy(name="web", namespace="default", containers=tuple(containers)), specs


def _times(fn: Any, count: int) -> list[float]:
    out = []
    for i in range(count):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered),
        "p99_us": ordered[int(len(ordered) * 0.99) - 1],
        "mean_us": statistics.fmean(ordered),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    policy, specs = _policy()
    engine = PolicyEngine(policy)
    target = "app7"
    def request_for(cid: str) -> dict[str, Any]:
        # Built before timing: a volume's source names the container it belongs to.
        return rq.container_request(container_id=cid, name=target, image=specs[target].image,
                                    spec=specs[target])

    create = request_for("x")
    request_bytes = len(json.dumps(create))
    requests = {i: request_for(f"c{i}") for i in range(-200, args.count)}

    def create_one(i: int) -> None:
        decision = engine.decide("CreateContainerRequest", requests[i])
        assert decision.allowed, decision.explanation()

    def cc(i: int) -> None:
        t0 = time.perf_counter_ns()
        create_one(i)
        cc_samples.append((time.perf_counter_ns() - t0) / 1000)
        engine.decide("RemoveContainerRequest", {"container_id": f"c{i}"})

    cc_samples: list[float] = []
    for i in range(200):  # warm up
        cc(-1 - i)
    cc_samples.clear()
    for i in range(args.count):
        cc(i)
    engine.decide("CreateContainerRequest", request_for("live"))
    exec_req = rq.exec_request(
        container_id="live", args=[f"/usr/bin/{target}", "--health"], spec=specs[target]
    )

    def ep(_: int) -> None:
        assert engine.decide("ExecProcessRequest", exec_req).allowed

    _times(ep, 200)
    ep_samples = _times(ep, args.count)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.platform()}",
        "containers": len(policy.containers),
        "count": args.count,
        "target_median_us": TARGET_US,
        "create_container_request_bytes": request_bytes,
        "CreateContainer": _summary(cc_samples),
        "ExecProcess": _summary(ep_samples),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['date']}  {result['machine']}")
    print(
        f"policy: {len(policy.containers)} containers; CreateContainer input {request_bytes} bytes; "
        f"{args.count} decisions each"
    )
    for name in ("CreateContainer", "ExecProcess"):
        s = result[name]
        assert isinstance(s, dict)
        verdict = "meets" if s["median_us"] <= TARGET_US else "MISSES"
        print(
            f"{name:16} median {s['median_us']:8.1f} us   p99 {s['p99_us']:8.1f} us   "
            f"mean {s['mean_us']:8.1f} us   ({verdict} the {TARGET_US:.0f} us median target)"
        )


if __name__ == "__main__":
    main()
