"""The harness behind scripts/bench, scripts/migrate-vm and scripts/demo (system python3, standard
library; python3-matplotlib for the migrate suite's plot), laid out like QEMU's migration
performance harness (tests/migration/guestperf):

    common      the project root, logging and fatal errors, packages and binaries (through
                scripts/lib/common.sh, which the shell scripts share)
    servers     nbd-umemd, nbdkit and other servers: start, wait until they listen (pidfile,
                socket), check they are alive, stop with SIGTERM then SIGKILL
    machines    two hosts on one machine: network namespaces, a veth pair, tc tbf on the link,
                link counters
    vm          the test VM: guest kit and initramfs (scripts/lib/guest.sh), QEMU arguments, the
                serial console stamped with the host time, QMP (scripts/lib/qmp.py)
    migration   a live migration of the test VM between two hosts, step by step, and its report
    fio         fio's nbd engine: one run and the figures of its JSON result
    suites      the benchmark suites: core, lazy, prefetch, migrate
    reports     medians, ratios, acceptance criteria, text and Markdown tables, the rate plot
    bench, migrate_vm, demo
                the command lines of scripts/bench, scripts/migrate-vm and scripts/demo
"""
