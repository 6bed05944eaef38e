"""Unit tests for tuning/check: requirement arithmetic, parsing, comparisons,
and agreement between the check and the shipped 99-gateway.conf/limits.conf.

    python3 -m unittest discover tuning      (from the repository root)
    python3 tuning/test_check.py
"""

import importlib.machinery
import importlib.util
import io
import json
import os
import unittest
from contextlib import redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
_loader = importlib.machinery.SourceFileLoader("gateway_tuning_check", os.path.join(HERE, "check"))
_spec = importlib.util.spec_from_loader(_loader.name, _loader)
check = importlib.util.module_from_spec(_spec)
_loader.exec_module(check)

GiB = 1 << 30


def read(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


# /proc values of the 2-core development VM these files were written on.
THIS_VM = {
    "fs.nr_open": "1048576",
    "fs.file-max": "2466170",
    "fs.file-nr": "850 0 2466170",
    "net.ipv4.tcp_mem": "287898 383867 575796",
    "net.ipv4.tcp_rmem": "4096 131072 33554432",
    "net.ipv4.tcp_wmem": "4096 16384 4194304",
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_max_syn_backlog": "2048",
    "net.ipv4.tcp_syncookies": "1",
    "net.core.netdev_max_backlog": "1000",
    "net.ipv4.tcp_migrate_req": "0",
    "net.ipv4.tcp_max_orphans": "131072",
    "net.ipv4.tcp_fin_timeout": "60",
    "net.ipv4.tcp_retries2": "15",
    "net.ipv4.tcp_keepalive_time": "7200",
    "net.ipv4.tcp_keepalive_intvl": "75",
    "net.ipv4.tcp_keepalive_probes": "9",
    "net.ipv4.ip_local_port_range": "32768 60999",
    "net.ipv4.tcp_tw_reuse": "2",
    "net.netfilter.nf_conntrack_max": "262144",
    "net.netfilter.nf_conntrack_count": "0",
    "kernel.io_uring_disabled": "0",
    "kernel.io_uring_group": "-1",
}


def snapshot(sysctl=None, nofile=(20000, 20000), mem_total=24684084 * 1024,
             kernel="6.18.44-fc-v669", pid=None, probe=(True, "works"), page=4096,
             service_gids=None):
    return {
        "sysctl": dict(THIS_VM if sysctl is None else sysctl),
        "nofile": nofile,
        "meminfo": {"MemTotal": mem_total, "MemAvailable": mem_total - GiB},
        "kernel": kernel,
        "cpus": 2,
        "page": page,
        "io_uring_probe": probe,
        "softnet_drops": 0,
        "service_user": "gateway",
        "service_gids": service_gids,
        "pid": pid,
    }


def tuned_snapshot(mem_total=32 * GiB):
    """A host with 99-gateway.conf applied and limits.conf's nofile."""
    sc = dict(THIS_VM)
    sc.update(check.parse_sysctl_conf(read("99-gateway.conf")))
    sc["net.netfilter.nf_conntrack_count"] = "5"  # conntrack in use: must pass too
    return snapshot(sc, nofile=(check.SHIPPED_NOFILE, check.SHIPPED_NOFILE),
                    mem_total=mem_total, kernel="6.8.0-45-generic")


def by_name(items, prefix):
    """The one item named exactly `prefix`, else the one whose name starts with it."""
    found = [i for i in items if i["name"] == prefix] or [
        i for i in items if i["name"].startswith(prefix)]
    assert len(found) == 1, (prefix, [i["name"] for i in items])
    return found[0]


class Parsing(unittest.TestCase):
    def test_parse_ints_tabs_and_newline(self):
        self.assertEqual(check.parse_ints("4096\t87380\t6291456\n"), [4096, 87380, 6291456])
        self.assertEqual(check.parse_ints("4096 87380 6291456"), [4096, 87380, 6291456])

    def test_parse_ints_rejects_garbage(self):
        for bad in ("", "  \n", "4096 lots", "0x10"):
            with self.assertRaises(ValueError):
                check.parse_ints(bad)

    def test_parse_int_needs_exactly_one(self):
        self.assertEqual(check.parse_int("1048576\n"), 1048576)
        self.assertEqual(check.parse_int("-1"), -1)
        with self.assertRaises(ValueError):
            check.parse_int("32768 60999")

    def test_parse_limits(self):
        text = (
            "Limit                     Soft Limit           Hard Limit           Units     \n"
            "Max cpu time              unlimited            unlimited            seconds   \n"
            "Max open files            20000                20000                files     \n"
            "Max locked memory         8388608              8388608              bytes     \n"
            "Max realtime timeout      unlimited            unlimited            us        \n")
        lim = check.parse_limits(text)
        self.assertEqual(lim["Max open files"], (20000, 20000))
        self.assertEqual(lim["Max cpu time"], (check.math.inf, check.math.inf))
        self.assertEqual(lim["Max realtime timeout"][0], check.math.inf)

    def test_parse_meminfo_units(self):
        mem = check.parse_meminfo("MemTotal:       24684084 kB\nHugePages_Total:       0\n"
                                  "MemAvailable:   24260940 kB\n")
        self.assertEqual(mem["MemTotal"], 24684084 * 1024)
        self.assertEqual(mem["HugePages_Total"], 0)

    def test_parse_kernel_version(self):
        self.assertEqual(check.parse_kernel_version("6.18.44-fc-v669"), (6, 18))
        self.assertEqual(check.parse_kernel_version("5.14.0-427.el9.x86_64"), (5, 14))
        self.assertLess(check.parse_kernel_version("5.4.0-150-generic"), check.MIN_KERNEL)
        with self.assertRaises(ValueError):
            check.parse_kernel_version("unknown")

    def test_parse_softnet_drops_is_hex_column_two(self):
        text = ("0000a1b2 00000010 00000000 00000000\n"
                "00000001 0000000f 00000000 00000000\n")
        self.assertEqual(check.parse_softnet_drops(text), 16 + 15)

    def test_parse_status_groups(self):
        text = "Name:\tgateway\nUid:\t998\t998\t998\t998\nGid:\t997\t997\t997\t997\nGroups:\t4 1001 \n"
        self.assertEqual(check.parse_status_groups(text), {997, 4, 1001})

    def test_parse_sysctl_conf(self):
        conf = check.parse_sysctl_conf(
            "# comment\n; other comment\n\nnet.ipv4.tcp_mem = 1  2\t3\n"
            "-net.netfilter.nf_conntrack_max=5\nnet/core/somaxconn = 7\n")
        self.assertEqual(conf, {"net.ipv4.tcp_mem": "1 2 3",
                                "net.netfilter.nf_conntrack_max": "5",
                                "net.core.somaxconn": "7"})
        with self.assertRaises(ValueError):
            check.parse_sysctl_conf("net.core.somaxconn 7\n")


class Arithmetic(unittest.TestCase):
    def test_fd_budget(self):
        self.assertEqual(check.fd_budget(1000000), 1051024)   # > default nr_open 1048576
        self.assertEqual(check.fd_budget(10000), 11524)
        self.assertEqual(check.fd_budget(1), 1026)            # 5% rounds up
        self.assertGreater(check.fd_budget(1000000), 1048576)

    def test_file_max_adds_the_rest_of_the_host(self):
        self.assertEqual(check.file_max_required(1000000), 1051024 + 65536)

    def test_tcp_mem_pages(self):
        self.assertEqual(check.tcp_mem_required(1000000), (1000000, 2000000))
        self.assertEqual(check.tcp_mem_required(1000, pages_per_conn=3), (1000, 3000))

    def test_parked_pages_bounds_the_measurements(self):
        # measured: 4096 -> 2 pages, 16384 -> 4, 131072 -> 27 (ss -m, r + f)
        self.assertEqual(check.parked_pages(4096, 4096), 2)
        self.assertGreaterEqual(check.parked_pages(16384, 4096), 4)
        self.assertGreaterEqual(check.parked_pages(131072, 4096), 27)

    def test_rmem_default_max(self):
        self.assertEqual(check.rmem_default_max(1000000, 2000000, 4096), 4096)
        self.assertEqual(check.rmem_default_max(10000, 575796, 4096), 56 * 4096)
        self.assertEqual(check.rmem_default_max(1000000, 1000000, 4096), 0)
        n, high = 1000000, 2097152
        bound = check.rmem_default_max(n, high, 4096)
        self.assertLessEqual(n * check.parked_pages(bound, 4096), high)
        self.assertGreater(n * check.parked_pages(bound + 1, 4096), high)

    def test_memory_required(self):
        need = check.memory_required(1000000, 2000000, 4096)
        self.assertEqual(need, 1000000 * (4608 + 384) + 2000000 * 4096 + GiB)
        self.assertTrue(13 * GiB < need < 15 * GiB)

    def test_connections_that_fit_is_the_largest(self):
        for total in (8 * GiB, 24684084 * 1024, 64 * GiB):
            n = check.connections_that_fit(total, 4096)
            self.assertLessEqual(check.memory_required(n, 2 * n, 4096), total)
            self.assertGreater(check.memory_required(n + 1, 2 * (n + 1), 4096), total)

    def test_comparisons_treat_missing_as_failing(self):
        self.assertTrue(check.at_least(5, 5))
        self.assertFalse(check.at_least(4, 5))
        self.assertFalse(check.at_least(None, 0))
        self.assertTrue(check.at_most(8, 8))
        self.assertFalse(check.at_most(None, 8))
        self.assertTrue(check.at_least(check.math.inf, 10 ** 9))


class ThisVm(unittest.TestCase):
    """The 2-core VM with a hard 20,000 open-files limit."""

    def test_one_million_is_short_with_fixes(self):
        items = check.evaluate(snapshot(), 1000000)
        self.assertEqual(check.exit_status(items), 1)
        nr = by_name(items, "fs.nr_open")
        self.assertEqual(nr["status"], "SHORT")
        self.assertIn("sysctl -w fs.nr_open=2097152", nr["fix"])
        hard = by_name(items, "RLIMIT_NOFILE hard")
        self.assertEqual((hard["status"], hard["current"]), ("SHORT", "20000"))
        self.assertTrue(any("LimitNOFILE=1100000" in f for f in hard["fix"]))
        self.assertTrue(any("gateway hard nofile 1100000" in f for f in hard["fix"]))
        self.assertTrue(any("fs.nr_open" in f for f in hard["fix"]))  # nr_open first
        mem = by_name(items, "net.ipv4.tcp_mem")
        self.assertEqual(mem["status"], "SHORT")
        self.assertIn('sysctl -w net.ipv4.tcp_mem="786432 1048576 2097152"', mem["fix"])
        self.assertEqual(by_name(items, "net.ipv4.tcp_rmem")["status"], "HIGH")
        self.assertEqual(by_name(items, "net.ipv4.tcp_max_orphans")["status"], "SHORT")
        self.assertEqual(by_name(items, "net.ipv4.tcp_migrate_req")["status"], "SHORT")
        self.assertEqual(by_name(items, "MemTotal")["status"], "OK")
        self.assertEqual(by_name(items, "fs.file-max")["status"], "OK")

    def test_ten_thousand_fits_the_descriptor_limits(self):
        items = check.evaluate(snapshot(), 10000)
        for name in ("fs.nr_open", "fs.file-max", "RLIMIT_NOFILE hard", "ulimit -n",
                     "net.ipv4.tcp_mem", "net.ipv4.tcp_rmem", "net.ipv4.tcp_max_orphans",
                     "MemTotal"):
            self.assertEqual(by_name(items, name)["status"], "OK", name)

    def test_text_output_lists_every_item(self):
        snap = snapshot()
        items = check.evaluate(snap, 1000000)
        text = check.render_text(snap, 1000000, items)
        self.assertIn("1,000,000 connections", text)
        self.assertIn("fix: sysctl -w fs.nr_open=2097152", text)
        self.assertIn("-> exit 1", text)
        for i in items:
            self.assertIn(i["name"], text)


class ShippedFiles(unittest.TestCase):
    def test_check_knows_the_shipped_sysctl_values(self):
        self.assertEqual(check.parse_sysctl_conf(read("99-gateway.conf")), check.SHIPPED)

    def test_every_setting_has_a_comment_above_it(self):
        lines = read("99-gateway.conf").splitlines()
        for n, line in enumerate(lines):
            if line.strip() and not line.lstrip().startswith("#"):
                self.assertTrue(lines[n - 1].lstrip().startswith("#"),
                                "no comment above line %d: %s" % (n + 1, line))

    def test_limits_conf_matches(self):
        rows = check.parse_limits_conf(read("limits.conf"))
        self.assertIn(("gateway", "soft", "nofile", str(check.SHIPPED_NOFILE)), rows)
        self.assertIn(("gateway", "hard", "nofile", str(check.SHIPPED_NOFILE)), rows)
        self.assertGreaterEqual(check.SHIPPED_NOFILE, check.fd_budget(1000000))
        self.assertLessEqual(check.SHIPPED_NOFILE, int(check.SHIPPED["fs.nr_open"]))

    def test_shipped_values_satisfy_one_million(self):
        items = check.evaluate(tuned_snapshot(), 1000000)
        bad = [(i["name"], i["current"], i["required"]) for i in items if i["status"] in ("SHORT", "HIGH")]
        self.assertEqual(bad, [])
        self.assertEqual(check.exit_status(items), 0)

    def test_shipped_tcp_mem_is_ordered(self):
        low, pressure, high = check.parse_ints(check.SHIPPED["net.ipv4.tcp_mem"])
        self.assertTrue(low <= pressure <= high)

    def test_two_million_needs_more_than_shipped(self):
        items = check.evaluate(tuned_snapshot(mem_total=64 * GiB), 2000000)
        nr = by_name(items, "fs.nr_open")
        self.assertEqual(nr["status"], "SHORT")
        self.assertIn("sysctl -w fs.nr_open=%d" % check.fd_budget(2000000), nr["fix"])
        mem = by_name(items, "net.ipv4.tcp_mem")
        self.assertIn('sysctl -w net.ipv4.tcp_mem="1500000 2000000 4000000"', mem["fix"])

    def test_small_ram_is_short(self):
        items = check.evaluate(tuned_snapshot(mem_total=8 * GiB), 1000000)
        mem = by_name(items, "MemTotal")
        self.assertEqual(mem["status"], "SHORT")
        self.assertIn("at most ~", mem["fix"][0])


class Rules(unittest.TestCase):
    def test_soft_below_but_hard_enough_is_ok(self):
        items = check.evaluate(snapshot(nofile=(1024, 2000000)), 1000000)
        soft = by_name(items, "ulimit -n")
        self.assertEqual(soft["status"], "OK")
        self.assertIn("raises soft to hard", soft["note"])

    def test_pid_limits(self):
        pid = {"pid": 4242, "nofile": (20000, 1100000), "open_fds": 17, "gids": {997}}
        items = check.evaluate(snapshot(pid=pid), 1000000)
        p = by_name(items, "pid 4242")
        self.assertEqual(p["status"], "SHORT")
        self.assertIn("20000 / 1100000 (17 open)", p["current"])
        self.assertIn("live: prlimit --pid 4242 --nofile=1100000:1100000", p["fix"])

    def test_missing_migrate_req_names_the_kernel(self):
        sc = dict(THIS_VM)
        del sc["net.ipv4.tcp_migrate_req"]
        items = check.evaluate(snapshot(sc, kernel="5.10.0"), 1000)
        self.assertEqual(by_name(items, "net.ipv4.tcp_migrate_req")["status"], "SHORT")
        self.assertIn("5.14", by_name(items, "net.ipv4.tcp_migrate_req")["note"])
        self.assertEqual(by_name(items, "kernel")["status"], "SHORT")

    def test_unparsable_tcp_mem_is_short(self):
        sc = dict(THIS_VM, **{"net.ipv4.tcp_mem": "garbage"})
        self.assertEqual(by_name(check.evaluate(snapshot(sc), 1000), "net.ipv4.tcp_mem")["status"], "SHORT")
        sc = dict(THIS_VM, **{"net.ipv4.tcp_mem": "1 2"})
        self.assertEqual(by_name(check.evaluate(snapshot(sc), 1000), "net.ipv4.tcp_mem")["status"], "SHORT")

    def test_io_uring_disabled(self):
        def status(disabled, group="-1", **kw):
            sc = dict(THIS_VM, **{"kernel.io_uring_disabled": disabled, "kernel.io_uring_group": group})
            return by_name(check.evaluate(snapshot(sc, **kw), 1000), "kernel.io_uring_disabled")["status"]
        self.assertEqual(status("0"), "OK")
        self.assertEqual(status("2"), "SHORT")
        self.assertEqual(status("1", "997"), "SHORT")
        self.assertEqual(status("1", "997", service_gids={997}), "OK")
        pid = {"pid": 1, "nofile": (1, 1), "open_fds": 1, "gids": {997}}
        self.assertEqual(status("1", "997", pid=pid), "OK")
        sc = dict(THIS_VM)
        del sc["kernel.io_uring_disabled"]
        self.assertEqual(by_name(check.evaluate(snapshot(sc), 1000), "kernel.io_uring_disabled")["status"], "OK")

    def test_io_uring_probe(self):
        items = check.evaluate(snapshot(probe=(False, "EPERM")), 1000)
        self.assertEqual(by_name(items, "io_uring_setup")["status"], "SHORT")
        items = check.evaluate(snapshot(probe=None), 1000)
        self.assertEqual([i for i in items if i["name"].startswith("io_uring_setup")], [])

    def test_conntrack(self):
        def get(mx, count):
            sc = dict(THIS_VM, **{"net.netfilter.nf_conntrack_max": mx,
                                  "net.netfilter.nf_conntrack_count": count})
            return by_name(check.evaluate(snapshot(sc), 1000000), "net.netfilter.nf_conntrack_max")
        self.assertEqual(get("262144", "0")["status"], "INFO")     # present, unused
        self.assertEqual(get("262144", "12")["status"], "SHORT")   # used, too small
        self.assertEqual(get("2000000", "12")["status"], "OK")
        sc = dict(THIS_VM)
        del sc["net.netfilter.nf_conntrack_max"], sc["net.netfilter.nf_conntrack_count"]
        self.assertEqual(by_name(check.evaluate(snapshot(sc), 1000000),
                                 "net.netfilter.nf_conntrack_max")["status"], "INFO")

    def test_syn_backlog_matters_only_without_cookies(self):
        sc = dict(THIS_VM, **{"net.ipv4.tcp_syncookies": "0"})
        items = check.evaluate(snapshot(sc), 1000)
        self.assertEqual(by_name(items, "net.ipv4.tcp_syncookies")["status"], "SHORT")
        self.assertEqual(by_name(items, "net.ipv4.tcp_max_syn_backlog")["status"], "SHORT")
        items = check.evaluate(snapshot(), 1000)
        self.assertEqual(by_name(items, "net.ipv4.tcp_max_syn_backlog")["status"], "INFO")

    def test_upper_bounds_report_high(self):
        items = check.evaluate(snapshot(), 1000)
        self.assertEqual(by_name(items, "net.ipv4.tcp_fin_timeout")["status"], "HIGH")
        self.assertEqual(by_name(items, "net.ipv4.tcp_retries2")["status"], "HIGH")

    def test_info_never_fails(self):
        items = [check.item("x", "1", "-", "INFO"), check.item("y", "1", "1", "OK")]
        self.assertEqual(check.exit_status(items), 0)
        self.assertEqual(check.exit_status(items + [check.item("z", "1", "2", "HIGH")]), 1)

    def test_zero_connections_rejected(self):
        with self.assertRaises(ValueError):
            check.evaluate(snapshot(), 0)


class LiveHost(unittest.TestCase):
    """Runs against the machine the tests run on; asserts shape, not values."""

    def test_json_output(self):
        out = io.StringIO()
        with redirect_stdout(out):
            rc = check.main(["--connections", "1000", "--json", "--no-probe"])
        doc = json.loads(out.getvalue())
        self.assertIn(rc, (0, 1))
        self.assertEqual(doc["exit"], rc)
        self.assertEqual(doc["connections"], 1000)
        self.assertEqual(doc["requirements"]["descriptors"], check.fd_budget(1000))
        self.assertTrue(all(i["status"] in ("OK", "SHORT", "HIGH", "INFO") for i in doc["items"]))


if __name__ == "__main__":
    unittest.main()
