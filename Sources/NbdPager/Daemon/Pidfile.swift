#if canImport(Glibc)
import Glibc
#endif

/// The daemon's pidfile: written atomically (a temporary file renamed into place), removed on exit.
struct Pidfile {
    let path: String

    func write() throws {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemError("open \(tmp)", errno: errno) }
        let text = Array("\(getpid())\n".utf8)
        let n = text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let e = errno
        close(fd)
        guard n == text.count else { throw SystemError("write \(tmp)", errno: e) }
        guard rename(tmp, path) == 0 else { throw SystemError("rename \(tmp)", errno: errno) }
    }

    func remove() { unlink(path) }
}
