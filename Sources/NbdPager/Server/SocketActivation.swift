import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// systemd socket activation: the service manager listens, and hands the listening sockets to the
/// daemon as descriptors 3, 4, ... with `LISTEN_PID` (this process) and `LISTEN_FDS` (how many).
public enum SocketActivation {
    /// The inherited listening sockets, or nil when the process was not socket-activated. Unsets the
    /// variables so that children (`--run`) do not take the sockets for theirs.
    public static func inheritedListeners() -> [NBDListener]? {
        guard let listeners = passedListeners else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        for case .inherited(let fd) in listeners { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return listeners
    }

    /// The sockets the variables announce for this process, without taking them (nil when none).
    public static var passedListeners: [NBDListener]? {
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let countText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
              let pid = Int32(pidText), pid == getpid(), let count = Int32(countText), count > 0, count < 1024
        else { return nil }
        return (0 ..< count).map { .inherited(fd: 3 + $0) }
    }

    /// Whether `fd` is an IPv4 or IPv6 socket (TCP options apply).
    static func isInternetSocket(_ fd: Int32) -> Bool {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0 else { return false }
        return Int32(storage.ss_family) == AF_INET || Int32(storage.ss_family) == AF_INET6
    }
}
