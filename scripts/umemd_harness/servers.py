"""Servers the harness runs: nbd-umemd, nbdkit (and anything else that writes a pidfile once it
listens), started as children of this process, waited for until they listen, stopped with SIGTERM
and then SIGKILL.

    srv = Server("nbd-umemd", [umemd, "serve", "--file", F, "--unix", S], pidfile=P, log=L)
    srv.start()          # fatal (with the server's log) if it exits or writes no pidfile in time
    srv.check_alive()    # fatal (with the tail of its log) if it has exited
    rc = srv.stop()      # SIGTERM, SIGKILL after 10 s; the exit status

A `Servers` set stops whatever is still running when it is closed (on every exit path).
"""
import os
import re
import signal
import subprocess
import sys
import time

from .common import die, log, read_text, tail, wait_for_file


class Server:
    def __init__(self, name, argv, pidfile, log_path, sock=None, env=None, netns=None, start_timeout=20,
                 announce=True, log_mode="ab", own_session=False):
        self.name, self.pidfile, self.log_path, self.sock = name, pidfile, log_path, sock
        # own_session: a session (and process group) of its own, so that a signal to this process
        # group (Ctrl-C, `timeout`) does not reach it: for a daemon that must outlive the cleanup
        # which needs it (a swap device's server: swapoff reads from it)
        self.own_session = own_session
        self.argv = list(argv)
        if netns:
            self.argv = ["ip", "netns", "exec", netns] + self.argv
        self.env = env
        self.start_timeout = start_timeout
        self.announce = announce
        self.log_mode = log_mode
        self.proc = None
        self.rc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def launch(self):
        """Starts the process (no waiting); its stdout and stderr go to its log."""
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except FileNotFoundError:
                pass
        if self.announce:
            prefix = "".join("%s=%s " % kv for kv in (self.env or {}).items())
            log("starting %s: %s%s" % (self.name, "env " + prefix if prefix else "", " ".join(self.argv)))
        env = dict(os.environ, **self.env) if self.env else None
        with open(self.log_path, self.log_mode) as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                         start_new_session=self.own_session)
        return self

    def wait_listening(self, timeout=None):
        """Waits until the pidfile is written (the server listens then); False if the server exits
        first or TIMEOUT (default start_timeout) s pass."""
        return wait_for_file(self.pidfile, self.start_timeout if timeout is None else timeout, alive=self.alive)

    def start(self):
        """launch, wait_listening and, if it has one, wait for its socket; fatal (with the server's
        log) if it does not come up."""
        self.launch()
        if not self.wait_listening():
            self.proc.kill()
            self.proc.wait()
            self.rc = self.proc.returncode
            log("%s log:" % self.name)
            sys.stderr.write(read_text(self.log_path))
            die("%s failed to start: %s" % (self.name, " ".join(self.argv)))
        if self.sock and not wait_for_file_or_socket(self.sock, 10):
            die("socket %s did not appear" % self.sock)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self, what="the benchmark"):
        """Fatal, with the tail of the server's log, if it is no longer running."""
        if self.proc is None or self.alive():
            return
        log("%s (pid %d) is no longer running (exit status %d); its log (%s):"
            % (self.name, self.proc.pid, self.proc.returncode, self.log_path))
        sys.stderr.write(tail(self.log_path, 50) + "\n")
        die("%s died during %s" % (self.name, what))

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout=10, quiet=False, stuck=None):
        """SIGTERM, wait up to TIMEOUT s (then SIGKILL, and STUCK() if given: for a process blocked
        on something else, which STUCK stops), reap; returns (and keeps) the exit status."""
        if self.proc is None:
            return self.rc
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("%s (pid %d) ignored SIGTERM for %d s; sending SIGKILL" % (self.name, self.proc.pid, timeout))
                self.proc.kill()
                if stuck is not None:
                    stuck()
                self.proc.wait()
            rc = self.proc.returncode
            if rc != 0 and not quiet:
                log("%s (pid %d) exited with status %d after SIGTERM" % (self.name, self.proc.pid, shell_status(rc)))
        self.rc = shell_status(self.proc.returncode)
        return self.rc

    def log_problems(self):
        """Lines of the server's log that look like errors or warnings."""
        pat = re.compile(r"\b(error|warning|critical|fatal)\b", re.I)
        return [l for l in read_text(self.log_path).splitlines() if pat.search(l)]


def shell_status(rc):
    """A Popen return code as the shell reports it (killed by signal N: 128 + N)."""
    return 128 - rc if rc is not None and rc < 0 else rc


def wait_for_file_or_socket(path, seconds):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_pid(pid, timeout=10):
    """SIGTERM to a process that is not our child, poll until it is gone (SIGKILL after TIMEOUT s)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Servers:
    """The servers a run has started; close() stops the ones still running (newest first)."""

    def __init__(self):
        self.live = []

    def start(self, server):
        self.live.append(server)
        server.start()
        return server

    def stop(self, server, what="the benchmark"):
        """Stops SERVER, which must still be running (fatal otherwise); returns its exit status."""
        server.check_alive(what)
        self.live.remove(server)
        return server.stop()

    def close(self):
        while self.live:
            self.live.pop().stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def nbdkit_server(name, args, sock, pidfile, log_path, env=None):
    """nbdkit -f -U SOCK -P PIDFILE ARGS (in the foreground, so it stays our child)."""
    return Server(name, ["nbdkit", "-f", "-U", sock, "-P", pidfile] + list(args), pidfile, log_path, sock=sock, env=env)
