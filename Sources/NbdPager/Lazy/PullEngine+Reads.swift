import Atomics
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

extension PullEngine {
    /// For a read whose pages are all absent: its data straight from the pulls that fetch them, before
    /// they are stored (no store write or read on the way to the client). Nil when some page is already
    /// present or local (the read then goes through `demand` and the store).
    /// `early`, when given, may be called with the read's data on the thread that receives it from the
    /// source, before the returned future completes (so the reply can go out without waiting for the
    /// event loop); it is only ever called for reads served by a single pull.
    func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                     early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>? {
        let pages = geometry.pages(covering: offset, length: length)
        guard !pages.isEmpty, store.count(of: .absent, in: pages) == UInt64(pages.count) else { return nil }
        let claimed = claim(pages, eventLoop: eventLoop)
        let covering = claimed.covering.sorted { $0.pages.lowerBound < $1.pages.lowerBound }
        // A page may have been stored between the check and the claim: then take the store path.
        var next = pages.lowerBound
        for p in covering where p.pages.lowerBound <= next { next = max(next, p.pages.upperBound) }
        guard next >= pages.upperBound else { return nil }
        let miss = Self.isMiss(claimed)
        if miss { demandStarted(pages) }
        let started = eventLoop.now
        // A miss answered by `early` is timed when the source's data arrives, on the receiving thread,
        // right before its reply is written: the future completes only after the pull's inline store
        // write and a hop to the loop, which the client does not wait for.
        let timed = ManagedAtomic(false)
        var hook = early
        if miss, let early {
            hook = { [self] data in
                if !timed.exchange(true, ordering: .relaxed) { recordMissLatency(since: started, on: eventLoop) }
                early(data)
            }
        }
        let result: EventLoopFuture<ByteBuffer>
        if covering.count == 1, let pull = covering.first {
            result = single(pull, offset: offset, length: length, eventLoop: eventLoop, early: hook)
        } else {
            result = assembled(covering, offset: offset, length: length, eventLoop: eventLoop)
        }
        if miss {
            result.whenComplete { outcome in
                if case .success = outcome, !timed.exchange(true, ordering: .relaxed) {
                    self.recordMissLatency(since: started, on: eventLoop)
                }
                self.demandFinished()
            }
        }
        return result
    }

    /// The read's bytes as a slice of one pull's data; `early` gets them on the receiving thread.
    private func single(_ pull: Pull, offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                        early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer> {
        let skip = Int(offset - geometry.byteOffset(ofPage: pull.pages.lowerBound))
        if let early {
            _ = pull.onArrival { data in
                if let slice = data.getSlice(at: data.readerIndex + skip, length: Int(length)) { early(slice) }
            }
        }
        return pull.data.futureResult.hop(to: eventLoop).flatMapThrowing { data in
            guard let slice = data.getSlice(at: data.readerIndex + skip, length: Int(length)) else {
                throw BackendError.system(SystemError("short pull at \(offset)", errno: EIO))
            }
            return slice
        }
    }

    /// The read's bytes put together from several pulls (in page order).
    private func assembled(_ covering: [Pull], offset: UInt64, length: UInt64,
                           eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer> {
        let geometry = self.geometry
        return EventLoopFuture.whenAllSucceed(covering.map { $0.data.futureResult }, on: eventLoop)
            .flatMapThrowing { parts in
                var out = ByteBufferAllocator().buffer(capacity: Int(length))
                let end = offset + length
                for (pull, data) in zip(covering, parts) {
                    let pullStart = geometry.byteOffset(ofPage: pull.pages.lowerBound)
                    let from = max(offset, pullStart)
                    let to = min(end, pullStart + UInt64(data.readableBytes))
                    guard from < to else { continue }
                    guard from == offset + UInt64(out.readableBytes),
                          let slice = data.getSlice(at: data.readerIndex + Int(from - pullStart), length: Int(to - from))
                    else { throw BackendError.system(SystemError("short pull at \(from)", errno: EIO)) }
                    out.writeImmutableBuffer(slice)
                }
                guard out.readableBytes == Int(length) else {
                    throw BackendError.system(SystemError("short pull at \(offset)", errno: EIO))
                }
                return out
            }
    }
}
