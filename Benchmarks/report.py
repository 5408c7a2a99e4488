"""Writes RESULTS.md and latency.svg from the results document that driver.py collects."""
import math
import os

# Issue 11 (format 2), against the rename baseline ("raw") and the append-only log ("rawlog").
GOAL_LATENCY_RATIO = 1.0          # p99 at N = 1, 4, 16 on tmpfs
GOAL_LATENCY_RATIO_LOOSE = 1.5    # p99 at N = 64 on tmpfs, and on disk
GOAL_LOG_RATIO = 2.5              # p99 against the append-only log at N = 16
GOAL_THROUGHPUT_RATIO = 1.0       # tmpfs, 1 and 4 writers
GOAL_THROUGHPUT_RATIO_DISK = 0.8  # disk with fsync
GOAL_RETENTION_SPREAD = 0.10      # N = 16 with 100 and with 10,000 retained changes
GOAL_IDLE_MS = 1.0
PG_LATENCY_RATIO = 2.0
PG_THROUGHPUT_RATIO = 0.5
SIGNED_IN_IDLE = "tab, signed in: run() with policy and proactive refresh"


def us(value):
    if value != value:  # NaN
        return "-"
    if value >= 10000:
        return f"{value / 1000:.1f} ms"
    return f"{value:.0f} µs"


def find(rows, **keys):
    for row in rows:
        if all(row.get(key) == value for key, value in keys.items()):
            return row
    return None


def pairs(rows, *keys):
    """Each TabSync row with the raw C rows (rename, log) that have the same values of `keys`."""
    for row in rows:
        if row["impl"] == "tabsync":
            raw = find(rows, impl="raw", **{key: row[key] for key in keys})
            if raw:
                yield row, raw, find(rows, impl="rawlog", **{key: row[key] for key in keys})


def goals(document):
    """(goal, figure, met) for each goal (issues 5, 10, 11, 14, 15)."""
    out = []
    for row, raw, rawlog in pairs(document["propagation"], "fs", "fsync", "readers"):
        ratio = row["p99_us"] / raw["p99_us"]
        bound = GOAL_LATENCY_RATIO if row["fs"] == "tmpfs" and row["readers"] <= 16 else GOAL_LATENCY_RATIO_LOOSE
        fsync = "fsync" if row["fsync"] else "no fsync"
        out.append((f"p99 propagation at most {bound:g}x the rename baseline's, N = {row['readers']}, {row['fs']}, {fsync}",
                    f"{us(row['p99_us'])} vs {us(raw['p99_us'])}: {ratio:.2f}x", ratio <= bound))
        if rawlog and row["fs"] == "tmpfs" and not row["fsync"] and row["readers"] == 16:
            ratio = row["p99_us"] / rawlog["p99_us"]
            out.append((f"p99 propagation within {GOAL_LOG_RATIO:g}x of the append-only log baseline, N = 16, tmpfs",
                        f"{us(row['p99_us'])} vs {us(rawlog['p99_us'])}: {ratio:.2f}x", ratio <= GOAL_LOG_RATIO))
    for fs in ("tmpfs", "disk"):
        for writers in (1, 4):
            tab = find(document["throughput"], impl="tabsync", fs=fs, writers=writers)
            raw = find(document["throughput"], impl="raw", fs=fs, writers=writers)
            if tab and raw:
                ratio = tab["per_second"] / raw["per_second"]
                bound = GOAL_THROUGHPUT_RATIO if fs == "tmpfs" else GOAL_THROUGHPUT_RATIO_DISK
                fsync = "fsync" if tab["fsync"] else "no fsync"
                out.append((f"throughput at least {bound:g}x the rename baseline's, {writers} writer(s), {fs}, {fsync}",
                            f"{tab['per_second']:.0f} vs {raw['per_second']:.0f} commits/s: {ratio:.2f}x", ratio >= bound))
    retention = {row["retained"]: row for row in document.get("retention", [])}
    if 100 in retention and 10000 in retention:
        low, high = sorted((retention[100]["p99_us"], retention[10000]["p99_us"]))
        spread = high / low - 1
        out.append((f"p99 propagation at N = 16 with 100 and with 10,000 retained changes within {GOAL_RETENTION_SPREAD:.0%} of each other",
                    f"{us(retention[100]['p99_us'])} and {us(retention[10000]['p99_us'])}: {spread:.0%} apart", spread <= GOAL_RETENTION_SPREAD))
    if document["storm"]:
        counts = sorted({row["refreshes"] for row in document["storm"]})
        storms = len(document["storm"])
        out.append(("exactly one refresh request per storm",
                    f"{storms} storms, refresh requests per storm: {', '.join(map(str, counts))}", counts == [1]))
        # Issue 14: the last of N tabs holds the new token this soon after the server answered.
        for count, bound in ((16, 10.0), (64, 40.0)):
            rows = [row for row in document["storm"] if row["readers"] == count]
            if rows:
                worst = max(row["overhead_ms"] for row in rows)
                out.append((f"storm of {count}: the last tab holds the new token within {bound:g} ms beyond the server's own time",
                            f"worst of {len(rows)} rounds: {worst:.1f} ms beyond", worst <= bound))
    bare = find(document["idle"], impl="Swift async process, no TabSync")
    for impl, label in (("tabsync", "storage only"), (SIGNED_IN_IDLE, "a signed-in tab running run()")):
        idle = find(document["idle"], impl=impl)
        if idle:
            # "No wake-ups of its own": at most the bare Swift process's, plus one for rounding.
            quiet = bare is None or idle["wakeups"] <= bare["wakeups"] + 1
            out.append((f"idle CPU under {GOAL_IDLE_MS:g} ms per 10 s and no wake-ups of its own, {label}",
                        f"{idle['cpu_ms']:.3f} ms, {idle['wakeups']:.0f} wake-ups per 10 s"
                        + (f" (bare Swift process: {bare['wakeups']:.0f})" if bare else ""),
                        idle["cpu_ms"] < GOAL_IDLE_MS and quiet))
    rows = document.get("postgres", [])
    tab = find(rows, kind="propagation", impl="tabsync-pg", readers=16)
    bare = find(rows, kind="propagation", impl="pgbare", readers=16)
    if tab and bare:
        ratio = tab["p99_us"] / bare["p99_us"]
        out.append((f"PostgreSQL: p99 propagation within {PG_LATENCY_RATIO:g}x of the bare baseline, N = 16",
                    f"{us(tab['p99_us'])} vs {us(bare['p99_us'])}: {ratio:.1f}x", ratio <= PG_LATENCY_RATIO))
    for writers in (1, 4):
        tab = find(rows, kind="throughput", impl="tabsync-pg", writers=writers)
        bare = find(rows, kind="throughput", impl="pgbare", writers=writers)
        if tab and bare:
            ratio = tab["per_second"] / bare["per_second"]
            out.append((f"PostgreSQL: throughput at least {PG_THROUGHPUT_RATIO:g} of the bare baseline, {writers} writer(s)",
                        f"{tab['per_second']:.0f} vs {bare['per_second']:.0f} commits/s: {ratio:.2f}", ratio >= PG_THROUGHPUT_RATIO))
    return out


def markdown(document):
    m = document["machine"]
    lines = []
    add = lines.append
    add("# TabSync benchmark results")
    add("")
    if m.get("quick"):
        add("**Quick run (--quick): fewer changes and rounds; not for publishing.**")
        add("")
    add(f"- Date: {m['date']}; the run took {m['minutes']:.1f} minutes.")
    add(f"- Machine: {m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, {m['swift']}; disk: {m['disk']}; tmpfs: /dev/shm.")
    add(f"- Load average before / after: {m['load']} / {m['load_after']} (a shared machine: other builds may run at the same time).")
    add(f"- Propagation: {document['changes']} measured changes per configuration after {document['warmup']} warm-up changes, "
        f"each reader a separate process. The writer commits the next change only when every reader has delivered the previous one "
        f"(one byte per reader on a FIFO), the same pacing for TabSync, the C baseline and the polling reader. "
        f"TabSync storages are first filled with {document['fill']} changes, as in a session in use.")
    add("")
    add("## Goals")
    add("")
    add("| goal | figure | met |")
    add("| --- | --- | --- |")
    for goal, figure, met in goals(document):
        add(f"| {goal} | {figure} | {'yes' if met else '**NO**'} |")
    add("")
    add("## 1. Propagation latency")
    add("")
    add("From just before the commit in the writer process to the moment the change is delivered in each reader process "
        "(TabSync: the `events()` loop has the event; the C baselines: inotify woke the reader and it read the change). "
        "p50 / p99 over all deliveries of all readers; \"all N\" is the p99 of the time until the last of the N readers had it. "
        "Baselines (Benchmarks/baseline/raw.c): *rename*, a temporary file renamed over the state; *log*, one 16-byte record "
        "appended with `pwrite` and read from each reader's offset. CPU is each reader process's CPU time per delivered change.")
    add("")
    add("| fs | fsync | N | TabSync p50 | p99 | all N p99 | rename p50 | p99 | log p50 | p99 | p99 vs rename | p99 vs log | CPU per change: TabSync / rename / log |")
    add("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row, raw, rawlog in pairs(document["propagation"], "fs", "fsync", "readers"):
        cpu = " / ".join(f"{r['cpu_us_per_change']:.0f} µs" if r and "cpu_us_per_change" in r else "-" for r in (row, raw, rawlog))
        add(f"| {row['fs']} | {'yes' if row['fsync'] else 'no'} | {row['readers']} | {us(row['p50_us'])} | {us(row['p99_us'])} | "
            f"{us(row['all_p99_us'])} | {us(raw['p50_us'])} | {us(raw['p99_us'])} | "
            f"{us(rawlog['p50_us']) if rawlog else '-'} | {us(rawlog['p99_us']) if rawlog else '-'} | "
            f"{row['p99_us'] / raw['p99_us']:.2f}x | {(row['p99_us'] / rawlog['p99_us']) if rawlog else float('nan'):.2f}x | {cpu} |")
    add("")
    inline = [row for row in document["propagation"] if row["impl"] == "tabsync-inline"]
    if inline:
        add("Without the hop to a task: the same TabSync readers with `onNotification` (the handler runs on the watcher "
            "thread) instead of `events()` (an `AsyncStream` whose consumer task wakes on another thread), tmpfs, no fsync:")
        add("")
        add("| N | events() p50 | p99 | onNotification p50 | p99 | rename p99 | log p99 | p99 vs rename | CPU per change: events() / onNotification |")
        add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in sorted(inline, key=lambda r: r["readers"]):
            tab = find(document["propagation"], impl="tabsync", fs="tmpfs", fsync=False, readers=row["readers"])
            raw = find(document["propagation"], impl="raw", fs="tmpfs", fsync=False, readers=row["readers"])
            rawlog = find(document["propagation"], impl="rawlog", fs="tmpfs", fsync=False, readers=row["readers"])
            if not (tab and raw and rawlog):
                continue
            add(f"| {row['readers']} | {us(tab['p50_us'])} | {us(tab['p99_us'])} | {us(row['p50_us'])} | {us(row['p99_us'])} | "
                f"{us(raw['p99_us'])} | {us(rawlog['p99_us'])} | {row['p99_us'] / raw['p99_us']:.2f}x | "
                f"{tab.get('cpu_us_per_change', float('nan')):.0f} µs / {row.get('cpu_us_per_change', float('nan')):.0f} µs |")
        add("")
    if document["polling"]:
        add(f"Polling reader (C, `stat` every 100 ms, what a shared token cache without notification does), tmpfs, "
            f"{document['poll_changes']} changes per N:")
        add("")
        add("| N | p50 | p99 | max |")
        add("| ---: | ---: | ---: | ---: |")
        for row in document["polling"]:
            add(f"| {row['readers']} | {us(row['p50_us'])} | {us(row['p99_us'])} | {us(row['max_us'])} |")
        add("")
    add("## 2. Refresh storm")
    add("")
    add("N `tab --json` processes on one session ask for a token at the same moment after the access token expired "
        "(devtoken-server, access tokens of 2 s, `--leeway 0`). \"Refreshes\" is what the server counted; \"last holds\" "
        "the time from sending `token` to all N until the last reply with the new token; \"server\" a lone refresh_token "
        "grant's HTTP round trip (median of 9); \"beyond\" the difference.")
    add("")
    add("| N | round | refreshes | first reply | median reply | last holds | server | beyond | distinct tokens |")
    add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in document["storm"]:
        add(f"| {row['readers']} | {row['round']} | {row['refreshes']} | {row['first_ms']:.1f} ms | {row['median_ms']:.1f} ms | "
            f"{row['last_ms']:.1f} ms | {row['server_ms']:.2f} ms | {row['overhead_ms']:.1f} ms | {row['distinct_tokens']} |")
    add("")
    add("## 3. Commit throughput")
    add("")
    add("Writer processes committing as fast as they can for a few seconds, each to its own key (TabSync `set`; rename: flock, "
        "read, write a temporary file, rename; log: flock, one `pwrite`).")
    add("")
    add("| fs | fsync | writers | TabSync commits/s | rename commits/s | log commits/s | vs rename | vs log |")
    add("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row, raw, rawlog in pairs(document["throughput"], "fs", "writers"):
        add(f"| {row['fs']} | {'yes' if row['fsync'] else 'no'} | {row['writers']} | {row['per_second']:.0f} | "
            f"{raw['per_second']:.0f} | {rawlog['per_second'] if rawlog else float('nan'):.0f} | {row['per_second'] / raw['per_second']:.2f}x | "
            f"{(row['per_second'] / rawlog['per_second']) if rawlog else float('nan'):.2f}x |")
    add("")
    add("## 4. Idle cost")
    add("")
    add("A process that watches a session and sees no change. CPU time and wake-ups (context switches) summed over all "
        "its threads from /proc/PID/task/*/schedstat and status, scaled to 10 s; resident memory from VmRSS.")
    add("")
    add("| process | CPU per 10 s | (from clock ticks) | wake-ups per 10 s | RSS | threads |")
    add("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in document["idle"]:
        add(f"| {row['impl']} | {row['cpu_ms']:.3f} ms | {row.get('tick_ms', float('nan')):.0f} ms | {row['wakeups']:.0f} | "
            f"{row['rss_mib']:.1f} MiB | {row['threads']} |")
    add("")
    add("The clock-tick figure (utime + stime, 10 ms resolution) counts threads that ended during the 10 s too. "
        "The Swift concurrency runtime keeps a 1 s Dispatch timer in any process that awaits, hence about 10 wake-ups "
        "per 10 s with or without TabSync; TabSync's own watcher thread sleeps in `pselect` with no timeout.")
    add("")
    add("## 5. Scaling with N")
    add("")
    add(f"tmpfs, no fsync, on this {m['cpus']}-core machine: each figure relative to N = 1 of the same implementation.")
    add("")
    add("| N | TabSync p50 | growth | TabSync p99 | growth | raw p50 | growth | raw p99 | growth |")
    add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {impl: find(document["propagation"], impl=impl, fs="tmpfs", fsync=False, readers=1) for impl in ("tabsync", "raw")}
    for readers in (1, 4, 16, 64):
        tab = find(document["propagation"], impl="tabsync", fs="tmpfs", fsync=False, readers=readers)
        raw = find(document["propagation"], impl="raw", fs="tmpfs", fsync=False, readers=readers)
        if not (tab and raw and base["tabsync"] and base["raw"]):
            continue
        add(f"| {readers} | {us(tab['p50_us'])} | {tab['p50_us'] / base['tabsync']['p50_us']:.1f}x | {us(tab['p99_us'])} | "
            f"{tab['p99_us'] / base['tabsync']['p99_us']:.1f}x | {us(raw['p50_us'])} | {raw['p50_us'] / base['raw']['p50_us']:.1f}x | "
            f"{us(raw['p99_us'])} | {raw['p99_us'] / base['raw']['p99_us']:.1f}x |")
    add("")
    add("![Propagation latency against N](latency.svg)")
    add("")
    if document.get("retention"):
        add("## 6. Retention")
        add("")
        add("The same propagation (tmpfs, no fsync, N = 16) with a log that keeps 100 changes (compacted every 100 or so "
            "during the run) and one that keeps 10,000 (filled with 12,000 first: it holds them all). A reader reads only what "
            "is new, so how far back the log reaches costs it nothing.")
        add("")
        add("| retained changes | p50 | p99 | all N p99 |")
        add("| ---: | ---: | ---: | ---: |")
        for row in document["retention"]:
            add(f"| {row['retained']} | {us(row['p50_us'])} | {us(row['p99_us'])} | {us(row['all_p99_us'])} |")
        add("")
    if document.get("postgres"):
        rows = document["postgres"]
        add("## 7. PostgreSQL (TabSyncPostgres)")
        add("")
        add("The same writer and readers with the store on PostgreSQL over loopback (a throw-away cluster, fsync off), "
            "next to the bare baseline (Benchmarks/baseline/pgbare.c: one transaction with an INSERT and a NOTIFY per "
            "change, listeners that read the row) and the file backend on tmpfs. Goals (issue 15): p99 within "
            f"{PG_LATENCY_RATIO:g}x of the bare baseline at N = 16, throughput at least {PG_THROUGHPUT_RATIO:g}x of its.")
        add("")
        add("| N | TabSyncPostgres p50 | p99 | bare p50 | p99 | p99 ratio | file backend p50 | p99 |")
        add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for readers in (1, 4, 16):
            tab = find(rows, kind="propagation", impl="tabsync-pg", readers=readers)
            bare = find(rows, kind="propagation", impl="pgbare", readers=readers)
            file = find(rows, kind="propagation", impl="tabsync-file", readers=readers)
            if tab and bare:
                add(f"| {readers} | {us(tab['p50_us'])} | {us(tab['p99_us'])} | {us(bare['p50_us'])} | {us(bare['p99_us'])} | "
                    f"{tab['p99_us'] / bare['p99_us']:.1f}x | {us(file['p50_us']) if file else '-'} | {us(file['p99_us']) if file else '-'} |")
        add("")
        add("| writers | TabSyncPostgres commits/s | bare commits/s | ratio |")
        add("| ---: | ---: | ---: | ---: |")
        for writers in (1, 4):
            tab = find(rows, kind="throughput", impl="tabsync-pg", writers=writers)
            bare = find(rows, kind="throughput", impl="pgbare", writers=writers)
            if tab and bare:
                add(f"| {writers} | {tab['per_second']:.0f} | {bare['per_second']:.0f} | {tab['per_second'] / bare['per_second']:.2f} |")
        add("")
    for rerun in document.get("reruns", []):
        add(f"Sections {', '.join(rerun['sections'])} were measured again on {rerun['date']} (load {rerun['load']}).")
        add("")
    return "\n".join(lines)


def svg(document):
    """Latency (log scale) against N (log scale), tmpfs without fsync."""
    width, height = 760, 460
    left, right, top, bottom = 80, 200, 40, 60
    series = []
    for impl, label, colour, rows in (("tabsync", "TabSync", "#d62728", document["propagation"]),
                                       ("raw", "rename baseline", "#1f77b4", document["propagation"]),
                                       ("rawlog", "append-log baseline", "#2ca02c", document["propagation"]),
                                       ("poll", "stat every 100 ms", "#7f7f7f", document["polling"])):
        points = sorted((row["readers"], row) for row in rows if row["impl"] == impl and row["fs"] == "tmpfs" and not row["fsync"])
        if points:
            series.append((label + " p50", colour, "", [(n, row["p50_us"]) for n, row in points]))
            series.append((label + " p99", colour, "6,4", [(n, row["p99_us"]) for n, row in points]))
    values = [value for _, _, _, points in series for _, value in points if value > 0]
    if not values:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    low = 10 ** math.floor(math.log10(min(values)))
    high = 10 ** math.ceil(math.log10(max(values)))
    plot_w, plot_h = width - left - right, height - top - bottom
    ns = [1, 4, 16, 64]

    def x(n):
        return left + plot_w * math.log2(n) / math.log2(ns[-1])

    def y(value):
        return top + plot_h * (1 - (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low)))

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='12'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{left}' y='22' font-size='14' font-weight='bold'>Propagation latency against N (tmpfs, no fsync) — "
           f"{document['machine']['date']}, {document['machine']['cpus']} CPUs</text>"]
    decade = low
    while decade <= high * 1.001:
        out.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{y(decade):.1f}' y2='{y(decade):.1f}' stroke='#ddd'/>")
        out.append(f"<text x='{left - 8}' y='{y(decade) + 4:.1f}' text-anchor='end'>{us(decade)}</text>")
        decade *= 10
    for n in ns:
        out.append(f"<line x1='{x(n):.1f}' x2='{x(n):.1f}' y1='{top}' y2='{top + plot_h}' stroke='#eee'/>")
        out.append(f"<text x='{x(n):.1f}' y='{top + plot_h + 18}' text-anchor='middle'>{n}</text>")
    out.append(f"<text x='{left + plot_w / 2}' y='{height - 18}' text-anchor='middle'>N (reader processes)</text>")
    out.append(f"<text x='18' y='{top + plot_h / 2}' text-anchor='middle' transform='rotate(-90 18 {top + plot_h / 2})'>latency (log scale)</text>")
    out.append(f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#333'/>")
    for index, (label, colour, dash, points) in enumerate(series):
        path = " ".join(f"{x(n):.1f},{y(value):.1f}" for n, value in points if value > 0)
        dash_attr = f" stroke-dasharray='{dash}'" if dash else ""
        out.append(f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='2'{dash_attr}/>")
        for n, value in points:
            if value > 0:
                out.append(f"<circle cx='{x(n):.1f}' cy='{y(value):.1f}' r='3' fill='{colour}'/>")
        legend_y = top + 10 + index * 20
        out.append(f"<line x1='{left + plot_w + 15}' x2='{left + plot_w + 45}' y1='{legend_y}' y2='{legend_y}' stroke='{colour}' stroke-width='2'{dash_attr}/>")
        out.append(f"<text x='{left + plot_w + 52}' y='{legend_y + 4}'>{label}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(document, directory):
    with open(os.path.join(directory, "RESULTS.md"), "w") as handle:
        handle.write(markdown(document))
    with open(os.path.join(directory, "latency.svg"), "w") as handle:
        handle.write(svg(document))
