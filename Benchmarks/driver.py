#!/usr/bin/env python3
"""Runs every TabSync benchmark and writes results/RESULTS.md, results/latency.svg and
results/results.json. Started by Benchmarks/run, which builds what it needs first.

Each measured party is its own process: `tabsync-bench ROLE` (Swift, TabSync) or `raw ROLE`
(C, baseline/raw.c: the rename pattern, "raw", or with --log the append-only log, "rawlog").
This script only starts them, waits and aggregates.
"""
import argparse
import datetime
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(round(fraction * len(sorted_values) + 0.5 - 1e-9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(samples_ns):
    values = sorted(samples_ns)
    return {
        "count": len(values),
        "p50_us": percentile(values, 0.50) / 1000,
        "p99_us": percentile(values, 0.99) / 1000,
        "max_us": values[-1] / 1000 if values else float("nan"),
    }


class Run:
    def __init__(self, args):
        self.args = args
        self.raw = args.raw
        self.bench = args.bench
        self.changes = 200 if args.quick else 2000
        self.warmup = 20 if args.quick else 50
        self.poll_changes = 30 if args.quick else 200
        self.fill = 600  # a storage in use: a history of 600 changes before the measured ones
        self.counter = 0
        self.tmpfs_root = f"/dev/shm/tabsync-bench-{os.getpid()}"
        self.disk_root = os.path.join(RESULTS, "tmp", f"run-{os.getpid()}")
        self.results = {"propagation": [], "polling": [], "throughput": [], "idle": [], "storm": [], "retention": [], "postgres": []}
        self.journal_entries = None
        self.fill_changes = None

    def fresh_dir(self, root):
        self.counter += 1
        path = os.path.join(root, f"s{self.counter}")
        os.makedirs(path, mode=0o700)
        os.chmod(root, 0o700)
        return path

    def command(self, impl):
        return [self.bench] if impl == "tabsync" else [self.raw]

    def durability(self, impl, fsync):
        journal = ["--journal-entries", str(self.journal_entries)] if impl == "tabsync" and self.journal_entries else []
        return self.fsync_option(impl, fsync) + journal

    def fsync_option(self, impl, fsync):
        if impl == "tabsync":
            return ["--durability", "file" if fsync else "none"]
        return (["--log"] if impl == "rawlog" else []) + (["--fsync"] if fsync else [])

    def prefill(self, impl, directory, fsync):
        if impl != "tabsync":
            return
        changes = self.fill_changes or self.fill
        subprocess.run(self.command(impl) + ["fill", "--dir", directory, "--changes", str(changes)] + self.durability(impl, fsync),
                       check=True, timeout=600)

    # 1. Propagation latency, and the polling reader.
    def planned_changes(self, impl, fs, fsync, readers):
        """The same number of changes for every configuration (2,000; 200 with --quick)."""
        return self.changes

    def propagation(self, impl, root, fsync, readers, role="reader", changes=None, gap_us=0):
        changes = changes or self.changes
        total = changes + self.warmup
        directory = self.fresh_dir(root)
        self.prefill(impl, directory, fsync)
        ack = directory + ".ack"
        os.mkfifo(ack, 0o600)
        outs = [f"{directory}.r{i}" for i in range(readers)]
        writer = self.command(impl) + ["writer", "--dir", directory, "--ack", ack, "--readers", str(readers),
                                       "--changes", str(total)] + self.durability(impl, fsync) + (["--gap-us", str(gap_us)] if gap_us else [])
        log_mode = ["--log"] if impl == "rawlog" else []
        reader_commands = [self.command(impl) + [role, "--dir", directory, "--ack", ack, "--changes", str(total), "--out", out] + log_mode
                           for out in outs]
        return self.measure(f"{impl} {role} N={readers}", writer, reader_commands, outs, changes)

    def measure(self, label, writer_command, reader_commands, outs, changes, env=None):
        """Runs a writer and its readers (ack FIFO protocol) and summarises the readers' samples."""
        total = changes + self.warmup
        started = time.monotonic()
        writer = subprocess.Popen(writer_command, env=env)
        procs = [subprocess.Popen(command, env=env) for command in reader_commands]
        deadline = started + (900 if not self.args.quick else 300)
        failed = None
        for proc in [writer] + procs:
            try:
                code = proc.wait(timeout=max(1, deadline - time.monotonic()))
                if code != 0:
                    failed = f"exit status {code}"
            except subprocess.TimeoutExpired:
                failed = "timed out"
        if failed:
            for proc in [writer] + procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            raise RuntimeError(f"{label} failed: {failed}")
        elapsed = time.monotonic() - started
        per_reader = []
        for out in outs:
            with open(out) as handle:
                values = [int(line) for line in handle if line.strip()]
            if len(values) != total:
                raise RuntimeError(f"{label}: a reader delivered {len(values)} of {total} changes")
            per_reader.append(values[self.warmup:])
        pooled = [value for values in per_reader for value in values]
        last = [max(values[i] for values in per_reader) for i in range(changes)]
        result = summary(pooled)
        result["all_p99_us"] = summary(last)["p99_us"]
        result["seconds"] = elapsed
        # CPU time per delivered change per reader (the whole reader process: start-up and the
        # warm-up included), where the readers report it.
        cpu = []
        for out in outs:
            if os.path.exists(out + ".cpu"):
                with open(out + ".cpu") as handle:
                    cpu.append(int(handle.read().strip()) / total)
        if cpu:
            result["cpu_us_per_change"] = statistics.mean(cpu) / 1000
        return result

    # 7. PostgreSQL (TabSyncPostgres) next to the bare baseline (pgbare.c: INSERT + NOTIFY, a
    # listener that reads the row) and the file backend, over loopback.
    def run_postgres(self):
        url, conninfo = self.args.postgres_url, self.args.postgres_conninfo
        env = dict(os.environ)  # PGPASSWORD from Benchmarks/run
        subprocess.run([self.args.pgbare, "setup", "--conninfo", conninfo], check=True, env=env, timeout=60)
        os.makedirs(self.tmpfs_root, mode=0o700, exist_ok=True)
        changes = self.changes // 2
        for readers in (1, 4, 16):
            for impl in ("tabsync-pg", "pgbare", "tabsync-file"):
                self.counter += 1
                ack = os.path.join(self.tmpfs_root, f"pgack{self.counter}")
                os.mkfifo(ack, 0o600)
                outs = [f"{ack}.r{i}" for i in range(readers)]
                total = str(changes + self.warmup)
                if impl == "tabsync-pg":
                    place = ["--postgres", url, "--store", f"bench-{os.getpid()}-{self.counter}"]
                    writer = [self.bench, "writer"] + place + ["--ack", ack, "--readers", str(readers), "--changes", total]
                    reader_commands = [[self.bench, "reader"] + place + ["--ack", ack, "--changes", total, "--out", out] for out in outs]
                elif impl == "pgbare":
                    key = f"p{self.counter}"
                    writer = [self.args.pgbare, "writer", "--conninfo", conninfo, "--key", key, "--ack", ack, "--readers", str(readers), "--changes", total]
                    reader_commands = [[self.args.pgbare, "reader", "--conninfo", conninfo, "--ack", ack, "--changes", total, "--out", out] for out in outs]
                else:
                    directory = self.fresh_dir(self.tmpfs_root)
                    writer = [self.bench, "writer", "--dir", directory, "--ack", ack, "--readers", str(readers), "--changes", total, "--durability", "none"]
                    reader_commands = [[self.bench, "reader", "--dir", directory, "--ack", ack, "--changes", total, "--out", out] for out in outs]
                log(f"postgres propagation {impl} N={readers}")
                result = self.measure(f"{impl} N={readers}", writer, reader_commands, outs, changes, env=env)
                result.update({"kind": "propagation", "impl": impl, "readers": readers, "changes": changes})
                self.results["postgres"].append(result)
                log(f"  p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us  ({result['seconds']:.1f} s)")
        seconds = 1 if self.args.quick else 3
        for writers in (1, 4):
            for impl in ("tabsync-pg", "pgbare"):
                self.counter += 1
                start_at = time.monotonic_ns() + 2_000_000_000
                if impl == "tabsync-pg":
                    commands = [[self.bench, "throughput", "--postgres", url, "--store", f"bench-{os.getpid()}-{self.counter}",
                                 "--start-at", str(start_at), "--seconds", str(seconds), "--key", f"w{i}"] for i in range(writers)]
                else:
                    start_real = time.time_ns() + 2_000_000_000
                    commands = [[self.args.pgbare, "throughput", "--conninfo", conninfo, "--start-at", str(start_real),
                                 "--seconds", str(seconds), "--key", f"t{self.counter}w{i}"] for i in range(writers)]
                procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for command in commands]
                commits, rate = self.collect_throughput(procs, seconds, impl)
                self.results["postgres"].append({"kind": "throughput", "impl": impl, "writers": writers, "commits": commits, "per_second": rate})
                log(f"postgres throughput {impl} writers={writers}: {rate:.0f} commits/s")

    def run_propagation(self):
        roots = [("tmpfs", self.tmpfs_root), ("disk", self.disk_root)]
        for fs, root in roots:
            os.makedirs(root, mode=0o700, exist_ok=True)
            for fsync in (False, True):
                for readers in (1, 4, 16, 64):
                    for impl in ("tabsync", "raw", "rawlog"):
                        log(f"propagation {impl} {fs} fsync={fsync} N={readers}")
                        changes = self.planned_changes(impl, fs, fsync, readers)
                        result = self.propagation(impl, root, fsync, readers, changes=changes)
                        result.update({"impl": impl, "fs": fs, "fsync": fsync, "readers": readers, "changes": changes})
                        self.results["propagation"].append(result)
                        log(f"  p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us  max {result['max_us']:.0f} us  ({result['seconds']:.1f} s)")
        # The same TabSync propagation with onNotification (no hop to a task), tmpfs, no fsync.
        for readers in (1, 4, 16, 64):
            log(f"propagation tabsync inline (onNotification) tmpfs N={readers}")
            result = self.propagation("tabsync", self.tmpfs_root, False, readers, role="inline-reader")
            result.update({"impl": "tabsync-inline", "fs": "tmpfs", "fsync": False, "readers": readers, "changes": self.changes})
            self.results["propagation"].append(result)
            log(f"  p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us")
        for readers in (1, 4, 16, 64):
            log(f"polling reader (stat every 100 ms) tmpfs N={readers}")
            result = self.propagation("raw", self.tmpfs_root, False, readers, role="poller", changes=self.poll_changes, gap_us=100_000)
            result.update({"impl": "poll", "fs": "tmpfs", "fsync": False, "readers": readers, "changes": self.poll_changes})
            self.results["polling"].append(result)
            log(f"  p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us")

    # 6. Retention: the same propagation with a log that keeps 100 or 10,000 changes (and holds
    # as many: filled with 1.2 times that first, no compaction yet). Goal: within 10 %.
    def run_retention(self):
        for entries in (100, 10000):
            readers = 16
            log(f"retention of {entries} changes: propagation tabsync tmpfs N={readers}")
            self.journal_entries, self.fill_changes = entries, entries * 6 // 5
            try:
                result = self.propagation("tabsync", self.tmpfs_root, False, readers)
            finally:
                self.journal_entries, self.fill_changes = None, None
            result.update({"impl": "tabsync", "fs": "tmpfs", "fsync": False, "readers": readers, "retained": entries})
            self.results["retention"].append(result)
            log(f"  p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us")

    # 3. Commit throughput.
    def run_throughput(self):
        seconds = 1 if self.args.quick else 3
        for fs, root, fsync in (("tmpfs", self.tmpfs_root, False), ("disk", self.disk_root, True)):
            for writers in (1, 4):
                for impl in ("tabsync", "raw", "rawlog"):
                    directory = self.fresh_dir(root)
                    self.prefill(impl, directory, fsync)
                    start_at = time.monotonic_ns() + 1_000_000_000
                    procs = [subprocess.Popen(self.command(impl) + ["throughput", "--dir", directory, "--start-at", str(start_at),
                                                                    "--seconds", str(seconds)] + self.durability(impl, fsync)
                                              + (["--key", f"w{i}"] if impl == "tabsync" else []),
                                              stdout=subprocess.PIPE, text=True) for i in range(writers)]
                    commits, rate = self.collect_throughput(procs, seconds, impl)
                    self.results["throughput"].append({"impl": impl, "fs": fs, "fsync": fsync, "writers": writers, "commits": commits, "per_second": rate})
                    log(f"throughput {impl} {fs} fsync={fsync} writers={writers}: {rate:.0f} commits/s")

    @staticmethod
    def collect_throughput(procs, seconds, impl):
        """(commits, commits per second) of throughput writers that print `COUNT NANOSECONDS`."""
        commits, elapsed = 0, 0
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"{impl} throughput writer failed")
            count, nanos = out.split()
            commits += int(count)
            elapsed = max(elapsed, int(nanos))
        return commits, commits / (elapsed / 1e9)

    # 4. Idle cost.
    @staticmethod
    def task_counters(pid):
        """{thread id: (CPU ns, context switches)} of every thread of `pid`."""
        tasks = {}
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                    cpu_ns = int(handle.read().split()[0])
                switches = 0
                with open(f"/proc/{pid}/task/{task}/status") as handle:
                    for line in handle:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
                tasks[task] = (cpu_ns, switches)
            except FileNotFoundError:
                pass
        return tasks

    @staticmethod
    def ticks(pid):
        """utime + stime of the whole process, exited threads included, in clock ticks."""
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    @staticmethod
    def status_field(pid, name):
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return line.split()[1:]
        return None

    def start_devtoken(self, ttl):
        """A devtoken-server on a free loopback port; returns (process, base URL)."""
        server = subprocess.Popen([self.args.devtoken, "--port", "0", "--access-ttl", str(ttl), "--quiet"],
                                  stdout=subprocess.PIPE, text=True)
        line = server.stdout.readline()
        if "listening on" not in line:
            server.kill()
            raise RuntimeError(f"devtoken-server did not start: {line!r}")
        return server, line.split("listening on", 1)[1].strip()

    def signed_in_tab(self, directory, base):
        """A `tab` signed in with a session policy and proactive refresh, running `run()` (issue 10).
        Returns the process once its own sign-in event has been printed."""
        proc = subprocess.Popen([self.args.tab, "--dir", directory, "--name", "idle", "--json",
                                 "--token-endpoint", base + "/token", "--client-id", "tabsync-demo",
                                 "--client-secret", "demo-secret", "--idle-timeout", "3600",
                                 "--absolute-timeout", "7200", "--proactive-refresh", "60"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

        def wait_line(predicate, what):
            end = time.monotonic() + 30
            while time.monotonic() < end:
                ready, _, _ = select.select([proc.stdout], [], [], max(0, end - time.monotonic()))
                if not ready:
                    break
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"idle tab exited while waiting for {what}")
                if predicate(json.loads(line)):
                    return
            raise RuntimeError(f"idle tab: timed out waiting for {what}")

        wait_line(lambda m: m.get("type") == "ready", "ready")
        proc.stdin.write(b"login alice wonderland\n")
        wait_line(lambda m: m.get("type") == "session" and m.get("state") == "signedIn", "its sign-in")
        return proc

    def run_idle(self):
        seconds = 3 if self.args.quick else 10
        parties = [("tabsync", [self.bench, "idle"]), ("tab, signed in: run() with policy and proactive refresh", None),
                   ("Swift async process, no TabSync", [self.bench, "bare-idle"]), ("raw inotify", [self.raw, "idle"]),
                   ("raw poll 100 ms", [self.raw, "idle", "--poll"])]
        running = []
        # Access tokens of an hour: nothing is due while the tab is measured.
        server, base = self.start_devtoken(3600)
        for name, command in parties:
            directory = self.fresh_dir(self.tmpfs_root)
            if command is None:
                running.append((name, self.signed_in_tab(directory, base), None))
                continue
            if name == "tabsync":
                self.prefill("tabsync", directory, False)
            ack = directory + ".ack"
            os.mkfifo(ack, 0o600)
            handle = os.open(ack, os.O_RDWR)
            proc = subprocess.Popen(command + ["--dir", directory, "--ack", ack])
            if len(os.read(handle, 1)) != 1:
                raise RuntimeError(f"{name} idle process did not start")
            running.append((name, proc, handle))
        # Start-up work settles first; idle Dispatch worker threads exit after about 5 s.
        time.sleep(1 if self.args.quick else 7)
        before = {name: (self.task_counters(proc.pid), self.ticks(proc.pid)) for name, proc, _ in running}
        time.sleep(seconds)
        hertz = os.sysconf("SC_CLK_TCK")
        for name, proc, handle in running:
            tasks, ticks = self.task_counters(proc.pid), self.ticks(proc.pid)
            old_tasks, old_ticks = before[name]
            # Per thread: a thread that started meanwhile counts from zero; one that ended is
            # missing from the sum (the tick count, which keeps it, is the cross-check).
            cpu_ns = sum(cpu - old_tasks.get(task, (0, 0))[0] for task, (cpu, _) in tasks.items())
            switches = sum(count - old_tasks.get(task, (0, 0))[1] for task, (_, count) in tasks.items())
            rss_kib = int(self.status_field(proc.pid, "VmRSS")[0])
            threads = int(self.status_field(proc.pid, "Threads")[0])
            result = {
                "impl": name, "seconds": seconds,
                "cpu_ms": cpu_ns / 1e6 * 10 / seconds,
                "tick_ms": (ticks - old_ticks) * 1000 / hertz * 10 / seconds,
                "ended_threads": len(set(old_tasks) - set(tasks)),
                "wakeups": switches * 10 / seconds,
                "rss_mib": rss_kib / 1024, "threads": threads,
            }
            self.results["idle"].append(result)
            log(f"idle {name}: {result['cpu_ms']:.3f} ms CPU and {result['wakeups']:.0f} wake-ups per 10 s, RSS {result['rss_mib']:.1f} MiB, {threads} threads")
            proc.kill()
            proc.wait()
            if handle is not None:
                os.close(handle)
        server.kill()
        server.wait()

    # 2. Refresh storm.
    def run_storm(self):
        rounds = 1 if self.args.quick else 3
        server, base = self.start_devtoken(2)
        try:
            server_ms = self.server_refresh_ms(base)
            log(f"devtoken-server at {base}: a lone refresh takes {server_ms:.2f} ms (HTTP round trip, median of 9)")
            for count in (16, 64):
                for round_number in range(rounds):
                    result = self.storm(base, count)
                    result.update({"readers": count, "round": round_number + 1, "server_ms": server_ms,
                                   "overhead_ms": result["last_ms"] - server_ms})
                    self.results["storm"].append(result)
                    log(f"storm N={count} round {round_number + 1}: {result['refreshes']} refresh request(s), "
                        f"last process holds the new token after {result['last_ms']:.1f} ms "
                        f"({result['overhead_ms']:.1f} ms beyond the server's {server_ms:.2f} ms)")
        finally:
            server.kill()
            server.wait()

    @staticmethod
    def post_form(url, fields):
        data = urllib.parse.urlencode(fields).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
            return json.loads(response.read())

    def server_refresh_ms(self, base):
        """The server's own time for one refresh: a refresh_token grant's round trip on loopback.
        Tokens stay in memory and are never printed."""
        client = {"client_id": "tabsync-demo", "client_secret": "demo-secret"}
        grant = self.post_form(base + "/token", {"grant_type": "password", "username": "alice", "password": "wonderland", **client})
        refresh = grant["refresh_token"]
        times = []
        for _ in range(9):
            started = time.monotonic()
            grant = self.post_form(base + "/token", {"grant_type": "refresh_token", "refresh_token": refresh, **client})
            times.append((time.monotonic() - started) * 1000)
            refresh = grant["refresh_token"]
        return statistics.median(times)

    @staticmethod
    def refresh_count(base):
        with urllib.request.urlopen(base + "/stats", timeout=10) as response:
            return json.loads(response.read())["refresh"]

    def storm(self, base, count):
        directory = self.fresh_dir(self.tmpfs_root)
        tabs = []
        for index in range(count):
            proc = subprocess.Popen([self.args.tab, "--dir", directory, "--name", f"t{index}", "--json",
                                     "--token-endpoint", base + "/token", "--client-id", "tabsync-demo",
                                     "--client-secret", "demo-secret", "--leeway", "0"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            os.set_blocking(proc.stdout.fileno(), False)
            tabs.append(proc)
        # One thread reads every tab's output with poll(2), so that a reply's time is taken when it arrives.
        poller = select.poll()
        owner = {proc.stdout.fileno(): index for index, proc in enumerate(tabs)}
        for fd in owner:
            poller.register(fd, select.POLLIN)
        pending = {fd: b"" for fd in owner}

        def wait_for(predicate, what, timeout=60):
            found = {}
            end = time.monotonic() + timeout
            while len(found) < predicate[1]:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"storm: timed out waiting for {what}")
                for fd, _ in poller.poll(remaining * 1000):
                    at = time.monotonic()
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise RuntimeError(f"storm: tab {owner[fd]} exited while waiting for {what}")
                    pending[fd] += chunk
                    while b"\n" in pending[fd]:
                        line, pending[fd] = pending[fd].split(b"\n", 1)
                        message = json.loads(line)
                        if predicate[0](message):
                            found[owner[fd]] = (at, message)
            return found

        def send(proc, text):
            proc.stdin.write(text.encode())

        try:
            wait_for((lambda m: m["type"] == "ready", count), "ready lines")
            send(tabs[0], "login alice wonderland\n")
            wait_for((lambda m: m.get("type") == "ok" and m.get("cmd") == "login", 1), "login")
            send(tabs[0], "status\n")
            status = wait_for((lambda m: m.get("type") == "status", 1), "status")
            expires_at_ms = next(iter(status.values()))[1]["expiresAt"]
            before = self.refresh_count(base)
            time.sleep(max(0, expires_at_ms / 1000 - time.time()) + 0.2)
            started = time.monotonic()
            for proc in tabs:
                send(proc, "token\n")
            replies = wait_for((lambda m: m.get("type") in ("token", "error") and m.get("cmd", "token") == "token", count), "token replies")
            times = sorted(at - started for at, _ in replies.values())
            last = times[-1]
            errors = [m for _, m in replies.values() if m["type"] == "error"]
            if errors:
                raise RuntimeError(f"storm: {len(errors)} tabs got an error: {errors[0].get('code')}")
            tokens = {m["accessToken"] for _, m in replies.values()}
            refreshed_here = sum(1 for _, m in replies.values() if m["refreshedHere"])
            fresh = all(m["expiresAt"] > expires_at_ms for _, m in replies.values())
            after = self.refresh_count(base)
            return {"refreshes": after - before, "last_ms": last * 1000, "first_ms": times[0] * 1000,
                    "median_ms": statistics.median(times) * 1000, "distinct_tokens": len(tokens),
                    "refreshed_here": refreshed_here, "all_new": fresh}
        finally:
            for proc in tabs:
                try:
                    send(proc, "quit\n")
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            for proc in tabs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def cleanup(self):
        shutil.rmtree(self.tmpfs_root, ignore_errors=True)
        shutil.rmtree(self.disk_root, ignore_errors=True)


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    swift = subprocess.run(["swift", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "cpu": model, "kernel": platform.release(),
        "swift": swift[0] if swift else "unknown",
        "load": " ".join(f"{value:.2f}" for value in os.getloadavg()),
        "disk": subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", RESULTS], capture_output=True, text=True).stdout.strip(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--tab", required=True)
    parser.add_argument("--devtoken", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer changes and rounds; for trying the benchmark, not for publishing")
    parser.add_argument("--only", default="propagation,throughput,idle,storm,retention,postgres")
    parser.add_argument("--pgbare", help="the bare PostgreSQL baseline (Benchmarks/baseline/pgbare.c)")
    parser.add_argument("--postgres-url", help="the PostgreSQL server for the postgres section (Benchmarks/run starts one)")
    parser.add_argument("--postgres-conninfo", help="the same server as a libpq conninfo, for pgbare")
    parser.add_argument("--merge", action="store_true", help="keep the other sections of an earlier results.json in --out")
    parser.add_argument("--out", help="where to write (default: results/, or results/tmp/quick/ with --quick, so that a quick run never replaces the published figures)")
    args = parser.parse_args()
    if args.out is None:
        args.out = os.path.join(RESULTS, "tmp", "quick") if args.quick else RESULTS

    info = machine()
    log(f"machine: {info['cpus']} CPUs, {info['cpu']}, Linux {info['kernel']}, load {info['load']}")
    run = Run(args)
    started = time.monotonic()
    try:
        steps = args.only.split(",")
        if "idle" in steps:
            run.run_idle()
        if "storm" in steps:
            run.run_storm()
        if "throughput" in steps:
            run.run_throughput()
        if "propagation" in steps:
            run.run_propagation()
        if "retention" in steps:
            run.run_retention()
        if "postgres" in steps:
            run.run_postgres()
    finally:
        run.cleanup()
    info["minutes"] = (time.monotonic() - started) / 60
    info["quick"] = args.quick
    info["load_after"] = " ".join(f"{value:.2f}" for value in os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    document = {"machine": info, "changes": run.changes, "warmup": run.warmup, "poll_changes": run.poll_changes,
                "fill": run.fill, **run.results}
    earlier = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(earlier):
        with open(earlier) as handle:
            merged = json.load(handle)
        ran = {"propagation": ["propagation", "polling"]}
        for step in steps:
            for section in ran.get(step, [step]):
                merged[section] = run.results[section]
        merged.setdefault("reruns", []).append({"sections": steps, "date": info["date"], "load": info["load"],
                                                "load_after": info["load_after"]})
        document = merged
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(document, handle, indent=1)
    import report
    report.write(document, args.out)
    log(f"wrote {args.out}/RESULTS.md and latency.svg in {info['minutes']:.1f} minutes")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
