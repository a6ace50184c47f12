#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The control socket's protocol, shared by the daemon and the `nbd-umemd status|prefetch|gate` verbs.
///
/// Wire format: JSON lines on a Unix stream socket. The client sends one request line and the daemon
/// answers one reply line, then closes the connection.
///
///     request:  {"command":"gate","action":"open","export":"ram0"}   ("export" optional)
///     reply:    {"ok":true,"gate":"open","was_closed":true,"released_pulls":1}
///               {"ok":false,"error":"not a lazy export: there is no gate"}
///
/// A request is the command's own fields plus `command` (its `ControlCommand.name`) and, optionally,
/// `export` (the export it is for; without it, the command goes to the export that answers it, or to
/// the daemon). A reply is `ok`, then either the command's `Reply` fields or `error`.
///
/// Adding a command: one type conforming to `ControlCommand` (its fields, its `Reply`) and one
/// registration (`ControlHandlers.on(_:_:)`) where it is answered: the daemon for daemon-wide
/// commands, an export kind's running export for its own.
public protocol ControlCommand: Codable, Sendable {
    /// The `command` value on the wire.
    static var name: String { get }
    associatedtype Reply: Codable & Sendable
}

/// What a request line says before its command is known.
public struct ControlRequestHeader: Codable, Sendable, Equatable {
    public var command: String
    public var export: String?
}

/// One request: a command and the export it is for. Encodes as one flat JSON object.
public struct ControlRequest<Command: ControlCommand>: Codable, Sendable {
    public var command: Command
    public var export: String?

    public init(_ command: Command, export: String? = nil) {
        self.command = command
        self.export = export
    }

    enum Keys: String, CodingKey { case command, export }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        let name = try c.decode(String.self, forKey: .command)
        guard name == Command.name else {
            throw DecodingError.dataCorruptedError(forKey: .command, in: c,
                                                   debugDescription: "expected command '\(Command.name)', got '\(name)'")
        }
        export = try c.decodeIfPresent(String.self, forKey: .export)
        command = try Command(from: decoder)
    }

    public func encode(to encoder: any Encoder) throws {
        try command.encode(to: encoder)
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(Command.name, forKey: .command)
        try c.encodeIfPresent(export, forKey: .export)
    }
}

/// One reply: `ok` and the command's reply fields, or `ok: false` and `error`. Encodes as one flat
/// JSON object.
public enum ControlReply<Body: Codable & Sendable>: Codable, Sendable {
    case ok(Body)
    case failure(String)

    enum Keys: String, CodingKey { case ok, error }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        if try c.decode(Bool.self, forKey: .ok) {
            self = .ok(try Body(from: decoder))
        } else {
            self = .failure(try c.decodeIfPresent(String.self, forKey: .error) ?? "unknown error")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        switch self {
        case .ok(let body):
            try body.encode(to: encoder)
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode(true, forKey: .ok)
        case .failure(let message):
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode(false, forKey: .ok)
            try c.encode(message, forKey: .error)
        }
    }

    public var errorMessage: String? {
        if case .failure(let m) = self { return m }
        return nil
    }
}

/// A command refused by whatever answers it (the message goes back as the reply's `error`).
public struct ControlError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The commands something (a `Target`: the daemon, or an export of some kind) answers, by wire
/// name: each decodes its request, runs against the target and encodes its reply.
public struct ControlHandlers<Target>: Sendable {
    typealias Handler = @Sendable (_ target: Target, _ line: [UInt8]) throws -> [UInt8]
    private var handlers: [String: Handler] = [:]

    public init() {}

    /// Registers the answer to `Command`: `body` returns its reply or throws `ControlError`; a
    /// request that does not decode throws (the caller answers it with an error).
    public func on<Command: ControlCommand>(
        _ type: Command.Type, _ body: @escaping @Sendable (Target, ControlRequest<Command>) throws -> Command.Reply
    ) -> Self {
        var copy = self
        copy.handlers[Command.name] = { target, line in
            let request = try JSONDecoder().decode(ControlRequest<Command>.self, from: Data(line))
            let reply: ControlReply<Command.Reply>
            do {
                reply = .ok(try body(target, request))
            } catch let error as ControlError {
                reply = .failure(error.description)
            }
            return try ControlCodec.encode(reply)
        }
        return copy
    }

    public var names: [String] { handlers.keys.sorted() }

    func handler(for name: String) -> Handler? { handlers[name] }
}

/// JSON encoding of the messages: one line each, keys sorted.
public enum ControlCodec {
    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try e.encode(value))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        try JSONDecoder().decode(type, from: Data(bytes))
    }

    /// A failure reply (for requests that never reach a command).
    public static func failure(_ message: String) -> [UInt8] {
        (try? encode(ControlReply<ControlNoFields>.failure(message))) ?? Array("{\"ok\":false}".utf8)
    }
}

/// A reply without fields of its own.
public struct ControlNoFields: Codable, Sendable, Equatable {
    public init() {}
}

extension JSONValue {
    /// The JSON form of a `Codable` value (an export kind's typed status fields).
    public init<T: Encodable>(encoding value: T) throws {
        self = try ControlCodec.decode(JSONValue.self, from: ControlCodec.encode(value))
    }
}
