"""bench/results/*.json -> Markdown tables (only figures the run produced)."""

from __future__ import annotations

from typing import Any


def _p(d: dict[str, Any] | None, unit: str = "") -> str:
    if not d or d.get("n", 0) == 0:
        return "n/a"
    return f"{d['p50']} / {d['p99']} / {d['max']}{unit}"


def _get(results: dict[str, Any], part: str) -> Any:
    v = results.get(part)
    return None if v is None or (isinstance(v, dict) and "error" in v) else v


def _ok(value: float | None, limit: float, below: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value < limit if below else value >= limit
    return "met" if met else "**missed**"


AT_SCALE = 100_000  # the fleet size the pick, memory and cold-start targets name


def _at_scale(workers: int, verdict: str) -> str:
    """A target stated for 100,000 workers is judged only there (a quick run's
    small fleets carry fixed costs over few workers: not the figure asked for)."""
    return verdict if workers >= AT_SCALE else f"target is for {AT_SCALE:,} (here: {verdict.strip('*')})"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def targets(r: dict[str, Any]) -> list[str]:
    rows: list[list[Any]] = []
    for t in _get(r, "throughput") or []:
        rows.append(
            [
                f"projector throughput, {t['workers']:,} workers",
                f"{t['ratio_to_pipelined']:.0%} of raw ({t['projector']['rate']:,} vs {max(x['rate'] for x in t['raw_pipelined']):,} events/s)",
                ">= 70%",
                _ok(t["ratio_to_pipelined"], 0.70, below=False),
            ]
        )
    for lat in _get(r, "latency") or []:
        if lat["events_per_s"] != 2000:
            continue
        w = f"{lat['workers']:,} workers"
        b, ro = lat["event_to_bucket_ms"], lat["event_to_router_ms"]
        rows.append(
            [f"event -> bucket p99, {w} at 2,000/s", f"{b['p99']} ms", "< 50 ms", _ok(b["p99"], 50)]
        )
        rows.append(
            [
                f"change -> router p99, {w} at 2,000/s",
                f"{ro['p99']} ms",
                "< 50 ms",
                _ok(ro["p99"], 50),
            ]
        )
        d = lat.get("detection")
        if d:
            v = d["beyond_timeout_ms"]["p99"]
            rows.append(
                [
                    f"detection p99 beyond timeout, {w}",
                    f"{v} ms ({d['detected']}/{d['killed']} detected, {d['false_expiries']} false)",
                    "< 1000 ms",
                    _ok(v, 1000) if d["detected"] == d["killed"] else "**missed**",
                ]
            )
    rt = _get(r, "routing") or []
    if rt:
        big = rt[-1]
        rows.append(
            [
                f"pick() p99, {big['workers']:,} workers",
                f"{big['pick_us']['p99']} us",
                "< 50 us",
                _at_scale(big["workers"], _ok(big["pick_us"]["p99"], 50)),
            ]
        )
        rows.append(
            [
                f"router memory, {big['workers']:,} workers",
                f"{big['memory_per_worker_bytes']} B/worker",
                "< 1 kB",
                _at_scale(big["workers"], _ok(big["memory_per_worker_bytes"], 1024)),
            ]
        )
    sc = _get(r, "scale")
    if sc:
        big = sc["sizes"][-1]
        rows.append(
            [
                f"registry memory, {big['workers']:,} workers (RSS after folding them)",
                f"{big['rss_per_worker_bytes']} B/worker",
                "< 3 kB",
                _at_scale(big["workers"], _ok(big["rss_per_worker_bytes"], 3072)),
            ]
        )
        cs = sc["cold_start"]
        per = round((cs["rss_after_mib"] - sc["empty_rss_mib"]) * 2**20 / cs["workers"])
        rows.append(
            [
                f"registry memory, {cs['workers']:,} workers (RSS after a cold start)",
                f"{per} B/worker",
                "< 3 kB",
                _at_scale(cs["workers"], _ok(per, 3072)),
            ]
        )
        rows.append(
            [
                f"cold start, {cs['workers']:,} workers",
                f"{cs['seconds']} s",
                "< 30 s",
                _at_scale(cs["workers"], _ok(cs["seconds"], 30)),
            ]
        )
    tr = _get(r, "trust")
    if tr:
        ratios = tr["ratios"]
        rows.append(
            [
                "secured / open projector throughput",
                f"{ratios['fold_rate']:.2f} ({tr['secured']['fold']['rate']:,} vs {tr['open']['fold']['rate']:,} events/s)",
                ">= 0.9",
                _ok(ratios["fold_rate"], 0.9, below=False),
            ]
        )
        b_open, b_sec = tr["open"]["event_to_bucket"], tr["secured"]["event_to_bucket"]
        rows.append(
            [
                "open / secured event -> bucket p99",
                f"{1 / ratios['event_to_bucket_p99']:.2f} ({b_sec['p99']} vs {b_open['p99']} ms)",
                ">= 0.9",
                _ok(1 / ratios["event_to_bucket_p99"], 0.9, below=False),
            ]
        )
    ha = _get(r, "ha")
    if ha:
        kill = ha["takeover"]["kill9_lease_s"]
        rows.append([f"takeover after kill -9 of the active registry, p99 over {kill['n']} kills",
                     f"{kill['p99']} s (p50 {kill['p50']}, max {kill['max']})", "<= 5 s",
                     _ok(kill["p99"], 5.0001)])  # fmt: skip
    rows += _http_targets(r.get("http"))
    return _table(["figure", "measured", "target", ""], rows)  # fmt: skip


def markdown(doc: dict[str, Any]) -> str:
    r, m = doc["results"], doc["machine"]
    out = [f"# Benchmark results ({doc['mode']} run, {doc['started_at']})", ""]
    out += [
        (
            f"Command: `{doc['command']}` ({doc.get('duration_s', '?')} s; load average at the "
            f"end {doc.get('load_avg_at_end', '?')})."
        ),
        "",
    ]
    out += [
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
            f"Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}, "
            f"msgspec {m['msgspec']}; load average at start {m['load_avg_at_start']}."
        ),
        "",
    ]
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    for k, e in errors.items():
        out += [f"**{k} failed:** {e}", ""]
    out += ["## Targets", ""] + targets(r)
    out += _throughput(_get(r, "throughput"))
    out += _latency(_get(r, "latency"))
    out += _routing(_get(r, "routing"))
    out += _scale(_get(r, "scale"))
    out += _trust(_get(r, "trust"))
    out += _service(_get(r, "service"))
    out += _ha(_get(r, "ha"))
    out += _http(_get(r, "http"))
    out += _at(_get(r, "at"))
    out += _churn(_get(r, "churn"))
    return "\n".join(out)


def _at(at: dict[str, Any] | None) -> list[str]:
    """`registry workers --at` against the registry's cold replay of the same stream."""
    if not at:
        return []
    out = ["## The fleet at a moment (`registry workers --at`)", ""]
    out += [(f"{at['workers']:,} workers, {at['events']:,} events in WORKER_EVENTS (a "
             "registration and heartbeats each); every fold is the best of the repeats."), ""]  # fmt: skip
    rows = [
        ["registry cold replay of the stream into an empty bucket (baseline, launch to folded)",
         f"{at['cold_replay_s']} s"],
        ["bucket read (`registry workers`, in process)", f"{at['bucket_read_s']} s"],
        [f"`fleet_at`, every event ({at['at_events_per_s']:,} events/s)", f"{at['at_end_s']} s"],
        [f"`fleet_at`, after the first round ({at['events_at_half']:,} events)",
         f"{at['at_half_s']} s"],
        ["a 1 ms ticker's waits while folding, p50 / p99 / max",
         _p(at["loop_wait_ms"]["folding"], " ms")],
        ["the same ticker with nothing running (the machine's noise)",
         _p(at["loop_wait_ms"]["idle"], " ms")],
        ["`registry workers --json`, launch to exit", f"{at['cli_workers_s']} s"],
        ["`registry workers --at T --json`, launch to exit", f"{at['cli_at_s']} s"],
        ["`registry.at`, first page (a fold) / next page (kept)",
         f"{at['service_first_page_s']} s / {at['service_next_page_s']} s"],
    ]  # fmt: skip
    out += _table(["what", "time"], rows)
    out += [", ".join(f"{k}: {v}x" for k, v in at["ratios"].items()), ""]
    return out


def _http_targets(h: dict[str, Any] | None) -> list[list[Any]]:
    """Gateway beside the original plan's service: a row per target, "not measured"
    with the reason when a side was skipped."""
    if not h or "error" in h:
        return []
    b, g = h["baseline"].get("best"), h["gateway"].get("best")
    if not (b and g and "ratios" in h):
        why = h["gateway"].get("skipped") or h["baseline"].get("skipped") or "a side failed"
        return [[name, f"not measured: {why}", target, "not measured"] for name, target in (
            ("gateway / baseline heartbeats per second", ">= 2"),
            ("gateway p99 < baseline p99", "lower"))]  # fmt: skip
    ratio, gp, bp = h["ratios"]["heartbeats_per_s"], g["latency_ms"]["p99"], b["latency_ms"]["p99"]
    errors = sum(g["errors"].values()) + sum(b["errors"].values())
    if errors:  # a request that failed is not a heartbeat answered: the rates are not comparable
        return [["gateway / baseline heartbeats per second", f"{ratio:.2f} with {errors} errors",
                 ">= 2", "**missed** (errors)"],
                ["gateway p99 < baseline p99", f"{gp} vs {bp} ms with {errors} errors", "lower",
                 "**missed** (errors)"]]  # fmt: skip
    return [
        ["gateway / baseline heartbeats per second",
         (f"{ratio:.2f} ({g['heartbeats_per_s']:,} vs {b['heartbeats_per_s']:,}/s, "
          f"{h['senders']} senders)"), ">= 2", _ok(ratio, 2.0, below=False)],
        ["gateway p99 < baseline p99", f"{gp} vs {bp} ms", "lower", _ok(gp, bp)],
    ]  # fmt: skip


def _http(h: dict[str, Any] | None) -> list[str]:
    if not h:
        return []
    out = ["## HTTP heartbeats: the gateway beside the original plan's service (bench/http.py)", ""]
    out += [(f"{h['workers']:,} workers registered, then {h['senders']} senders (one keep-alive "
             f"connection each) posting heartbeats back to back: {h['warmup_s']} s warm-up, "
             f"{h['duration_s']} s measured, {h['rounds']} round(s) each, alternating."), ""]  # fmt: skip
    rows = []
    for name, label in (("baseline", "original plan (FastAPI + Redis)"),
                        ("gateway", "registry http (NATS)")):  # fmt: skip
        side = h[name]
        if "skipped" in side:
            rows.append([label, f"skipped: {side['skipped']}", "", "", "", "", ""])
        for i, run in enumerate(side.get("runs", [])):
            cpu = ", ".join(f"{k} {'gone' if v is None else f'{v}%'}"
                            for k, v in run["cpu_percent"].items())  # fmt: skip
            errors = sum(run["errors"].values())
            rows.append([f"{label}, round {i + 1}", f"{run['heartbeats_per_s']:,}",
                         _p(run["latency_ms"], " ms"), f"{run['heartbeats_per_cpu_s']:,}" if run.get("heartbeats_per_cpu_s") else "n/a",
                         f"{errors}" + (f" {run['errors']}" if errors else ""),
                         f"{run['register_s']} s", cpu])  # fmt: skip
    out += _table(["service", "heartbeats/s", "latency p50/p99/max",
                   "heartbeats per CPU-second of the service", "errors",
                   f"{h['workers']:,} registrations", "CPU (% of a core)"], rows)  # fmt: skip
    if "ratios" in h:
        r = h["ratios"]
        out += [(f"Best round of each: gateway / baseline throughput {r['heartbeats_per_s']}, "
                 f"p99 {r['p99']}, heartbeats per CPU-second "
                 f"{r.get('heartbeats_per_cpu_s', 'n/a')}."), ""]  # fmt: skip
    for name in ("baseline", "gateway"):
        if h[name].get("stack"):
            stack = ", ".join(f"{k} {v}" for k, v in h[name]["stack"].items())
            out += [f"{name}: {stack}.", ""]
    for run in h["gateway"].get("runs", []):
        if run.get("accepted_not_stored"):
            out += [(f"**{run['accepted_not_stored']} heartbeats answered 2xx are not in "
                     "WORKER_EVENTS.**"), ""]  # fmt: skip
    return out


def _ha(ha: dict[str, Any] | None) -> list[str]:
    if not ha:
        return []
    t, c = ha["takeover"], ha["cluster"]
    out = ["## Active/standby and the 3-node cluster (bench/ha.py)", ""]
    out += _table(["after", "another registry holds the lease (s) p50/p99/max",
                   "an event published then is folded (s) p50/p99/max"], [
        [f"kill -9 of the active one ({t['kill9_lease_s']['n']} times)", _p(t["kill9_lease_s"]),
         _p(t["kill9_folding_s"])],
        [f"SIGTERM of the active one ({t['sigterm_lease_s']['n']} times)", _p(t["sigterm_lease_s"]),
         ""],
    ])  # fmt: skip
    out += [f"Lease TTL {t['lease_ttl_s']} s, renewed every second.", ""]
    out += _table(["servers", "events", "folded in", "events/s"], [
        ["one nats-server", f"{c['single']['events']:,}", f"{c['single']['seconds']} s",
         f"{c['single']['rate']:,}"],
        ["3-node cluster, R3", f"{c['r3_cluster']['events']:,}", f"{c['r3_cluster']['seconds']} s",
         f"{c['r3_cluster']['rate']:,}"],
    ])  # fmt: skip
    out += [f"R3 cluster / single node: {c['ratio_r3_over_single']} ({c['workers']:,} workers, "
            f"{c['rounds']} heartbeats each, preloaded).", ""]  # fmt: skip
    return out


def _trust(tr: dict[str, Any] | None) -> list[str]:
    if not tr:
        return []
    out = ["## Secured beside open (bench/trust.py)", ""]
    rows = []
    for mode in ("open", "secured"):
        m = tr[mode]
        rows.append([
            mode, f"{m['start_s']} s", f"{m['idle_rss_mb']} MiB", f"{m['fold']['rate']:,}/s",
            _p(m["event_to_bucket"], " ms"), f"{m['connect']['ms_per_connection']} ms",
            f"{m['connect']['server_rss_mb']} MiB ({m['connect']['count']:,} clients; "
            f"{m['connect'].get('server_kb_per_connection', '?')} KiB each)",
        ])  # fmt: skip
    out += _table(["server", "start", "idle RSS", "fold", "event -> bucket p50/p99/max",
                   "per connection", "server RSS connected"], rows)  # fmt: skip
    out += [f"Fold runs (events/s, interleaved): open {tr['open'].get('fold_runs')}, "
            f"secured {tr['secured'].get('fold_runs')}; the best of each is compared.", ""]
    out += [f"Minting credentials: {tr['mint']['per_second']:,} per second "
            f"({tr['mint']['count']:,} minted).", ""]  # fmt: skip
    return out


def _throughput(tp: list[dict[str, Any]] | None) -> list[str]:
    if not tp:
        return []
    rows = [[
        f"{t['workers']:,}", f"{t['events']:,} ({t['mix']['register']:,} reg + {t['mix']['heartbeat']:,} hb)",
        f"{t['projector']['rate']:,}",
        " / ".join(f"{x['rate']:,}" for x in t["raw_pipelined"]), f"{t['ratio_to_pipelined']:.0%}",
        f"{t['raw_straightforward']['rate']:,}", f"{t['ratio_to_straightforward']:.0%}",
        f"{t['raw_lean']['rate']:,}", f"{t['ratio_to_lean']:.0%}",
        f"{t['projector']['availability_published']:,}",
    ] for t in tp]  # fmt: skip
    head = ["workers", "events", "projector ev/s", "raw pipelined ev/s (before / after)",
            "ratio", "raw straightforward ev/s", "ratio", "raw lean ev/s (ceiling)", "ratio",
            "availability msgs"]  # fmt: skip
    return ["## Projector throughput at saturation", ""] + _table(head, rows)


def _latency(lat: list[dict[str, Any]] | None) -> list[str]:
    if not lat:
        return []
    rows = [[
        f"{x['workers']:,}", x["heartbeat_interval_s"], f"{x['events_per_s']:,}",
        _p(x["event_to_bucket_ms"]), _p(x["event_to_bucket_stored_ms"]), _p(x["event_to_router_ms"]),
        _p(x["availability_to_router_ms"]),
        f"{x['cpu_percent']['registry']} / {x['cpu_percent']['nats-server']} / {x['cpu_percent']['simulator']}",
        f"{x['registry_gc_in_window']['gen2_collections']} / {x['registry_gc_in_window']['max_pause_ms_since_start']}",
    ] for x in lat]  # fmt: skip
    head = ["workers", "interval s", "events/s", "event -> bucket ms (p50 / p99 / max)",
            "event -> bucket stored ms", "event -> router ms", "availability -> router ms",
            "CPU % registry / nats / simulator", "registry full GCs (warm-up to fleet exit) / longest GC pause ms"]  # fmt: skip
    out = ["## Latency at a steady fleet", ""] + _table(head, rows)
    det = [[f"{x['workers']:,}", x["heartbeat_interval_s"], x["detection"]["killed"],
            x["detection"]["detected"], x["detection"]["false_expiries"],
            _p(x["detection"].get("unavailable_after_last_beat_ms")),
            _p(x["detection"]["beyond_timeout_ms"])]
           for x in lat if x.get("detection")]  # fmt: skip
    if det:
        out += ["## Failure detection", ""]
        out += _table(["workers", "interval s", "killed", "expired", "false expiries",
                       "router sees it unavailable (late), ms after last heartbeat",
                       "router sees it expired, ms beyond timeout (p50 / p99 / max)"], det)  # fmt: skip
    return out


def _routing(rt: list[dict[str, Any]] | None) -> list[str]:
    if not rt:
        return []
    rows = [[f"{x['workers']:,}", x["pick_us"]["p50"], x["pick_us"]["p99"], x["pick_us"]["max"],
             x["memory_per_worker_bytes"], x["ready_s"]] for x in rt]  # fmt: skip
    head = ["workers", "pick() p50 us", "p99 us", "max us", "router B/worker (tracemalloc)",
            "ready() s (follow the stream to the end)"]  # fmt: skip
    return ["## Routing", ""] + _table(head, rows)


def _scale(sc: dict[str, Any] | None) -> list[str]:
    if not sc:
        return []
    rows = [[f"{x['workers']:,}", x["rss_mib"], x["rss_per_worker_bytes"], f"{x['fold_rate']:,}",
             x["bucket_bytes_per_worker"], x["availability_bytes_per_worker"]] for x in sc["sizes"]]  # fmt: skip
    head = ["workers", "registry RSS MiB", "registry B/worker", "fold ev/s (register + 1 heartbeat)",
            "bucket B/worker", "availability stream B/worker"]  # fmt: skip
    out = ["## Scale", "", f"Registry RSS with an empty bucket: {sc['empty_rss_mib']} MiB.", ""]
    out += _table(head, rows)
    cs = sc["cold_start"]
    per = round((cs["rss_after_mib"] - sc["empty_rss_mib"]) * 2**20 / cs["workers"])
    out += [
        (
            f"Cold start with {cs['workers']:,} workers in the bucket: {cs['seconds']} s from "
            f"process launch to caught up and sweeping. RSS after it: {cs['rss_after_mib']} MiB, "
            f"{per} B/worker over the empty registry (no backlog garbage, unlike the table "
            "above)."
        ),
        "",
    ]
    s = sc.get("stream")
    if s:
        ext = s["extrapolated_mib"]
        worst = s["extrapolated_worst_mib"]
        out += ["### WORKER_EVENTS size per worker", ""]
        out += [(f"Per-subject limit {s['max_msgs_per_subject']}: measured on {s['sample_workers']} workers "
                f"driven past it ({s['messages_per_worker']} messages kept per worker): "
                f"**{s['bytes_per_worker']:,} B/worker**; worst case (also {s['max_msgs_per_subject']}+ "
                f"restarts and expiries: {s['worst_case_messages_per_worker']} messages): "
                f"**{s['worst_case_bytes_per_worker']:,} B/worker**. A day at a 5 s interval is "
                f"{s['day_at_5s_heartbeats']:,} heartbeats per worker, far past the limit, so this is "
                "the size after a day (or a year)."), ""]  # fmt: skip
        out += _table(["workers", "stream MiB (typical)", "stream MiB (worst case)"],
                      [[f"{int(n):,}", ext[n], worst[n]] for n in ext])  # fmt: skip
    return out


def _service(sv: list[dict[str, Any]] | None) -> list[str]:
    if not sv:
        return []
    out = ["## Query service", ""]
    for x in sv:
        n, local = x["over_nats"], x["in_process"]
        out += [f"### {x['workers']:,} workers", ""]
        out += _table(["request, round trip over NATS", "p50 / p99 / max us", "answer bytes (max)"],
                      [[k, _p(v), v["answer_bytes_max"]] for k, v in n.items()])  # fmt: skip
        out += _table(["computed in process", "p50 / p99 / max us"],
                      [[k, _p(v)] for k, v in local.items()])  # fmt: skip
        out += [", ".join(f"{k}: {v}x" for k, v in x["ratios"].items()), ""]
    return out


def _churn(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    out = ["## Churn without growth (bench/churn.py)", ""]
    out += [(f"{c['live']:,} live workers beating every {c['interval_s']:.0f} s throughout; "
             f"{c['churn']:,} distinct ids registered over {c['churn_s']:.0f} s, each living "
             f"{c['life_s'][0]:.0f}-{c['life_s'][1]:.0f} s, then unregistering or ({c['silent_share']:.0%}) "
             f"falling silent and expiring; retention {c['settings']['retention_s']:.0f} s, marker TTL "
             f"{c['settings']['purge_marker_ttl_s']} s. Timeline (s from the first churned id): "
             f"{c['timeline_s']}."), ""]  # fmt: skip
    pk = c["peak"]
    rows = []
    for name, key, sub in (
        ("registry records", "registry", "records"), ("registry RSS (MiB)", "registry", "rss_mib"),
        ("registry RSS after malloc_trim (MiB)", "registry", "rss_trimmed_mib"),
        ("registry Python blocks", "registry", "heap_blocks"),
        ("router index (workers)", "router", "workers"), ("router RSS (MiB)", "router", "rss_mib"),
        ("router RSS after malloc_trim (MiB)", "router", "rss_trimmed_mib"),
        ("router Python blocks", "router", "heap_blocks"),
        ("KV_workers messages", "bucket", "messages"), ("KV_workers bytes", "bucket", "bytes"),
        ("WORKER_AVAILABILITY messages", "availability", "messages"),
        ("WORKER_AVAILABILITY bytes", "availability", "bytes"),
        ("WORKER_EVENTS messages (history, kept)", "events", "messages"),
    ):  # fmt: skip
        ratio_key = f"{key}_{sub.removesuffix('_mib')}"
        rows.append([name, f"{c['baseline'][key][sub]:,}", f"{c['start'][key][sub]:,}",
                     f"{pk[f'{key}_{sub}']:,}" if f"{key}_{sub}" in pk else "",
                     f"{c['end'][key][sub]:,}", c["end_over_baseline"].get(ratio_key)])  # fmt: skip
    out += _table(["figure", "baseline (live fleet only)", "start", "peak", "end",
                   "end / baseline"], rows)  # fmt: skip
    if len(c.get("waves", [])) > 1:
        w = c["end_over_first_wave"]
        out += [(f"After the last wave / after the first ({len(c['waves'])} waves of distinct ids): "
                 f"registry RSS {w['registry_rss']}, Python blocks {w['registry_heap_blocks']}; "
                 f"router RSS {w['router_rss']}, blocks {w['router_heap_blocks']}; "
                 f"KV_workers bytes {w['bucket_bytes']}, WORKER_AVAILABILITY bytes "
                 f"{w['availability_bytes']}."), ""]  # fmt: skip
    out += [(f"While churning: projector lag at most {pk.get('lag_s')} s, {pk.get('pending')} "
             f"events pending; counters at the end {c['counters']}. What the registry holds at "
             f"the end: {c['end']['registry']['held']}."), ""]  # fmt: skip
    return out
