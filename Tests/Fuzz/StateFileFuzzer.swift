// libFuzzer entry point for the state-file decoder (scripts/fuzz builds and runs it).
//
// Compiled together with Sources/TabSync/State/StateFileCodec.swift, StateBody.swift, StateDocument.swift and
// TabSyncError.swift, so that the fuzzer exercises the decoder's own internal code, not a copy.
//
// Each input is decoded twice: as it is, and with its header line rebuilt around the same body
// (correct length and CRC-32, the body's sequence number), because a random mutation almost
// never keeps the checksum right, and without the repair the JSON body and the journal checks
// behind the checksum would hardly be reached.
//
// Any input must either decode to a document that survives encoding and decoding again, or
// throw a corruptState / unsupportedVersion error naming the path. A crash, a trap or any
// other error is a finding.

import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func stateFileFuzzerTestOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    check(bytes)
    check(repaired(bytes))
    return 0
}

private let path = "/fuzz/app.state"

private func check(_ bytes: [UInt8]) {
    do {
        let document = try StateFileCodec.decode(bytes, path: path)
        let again = try StateFileCodec.decode(StateFileCodec.encode(document), path: path)
        if again != document {
            fatalError("a decoded document does not survive encoding and decoding again")
        }
        // Differential: what the hand-written decoder accepts, Foundation's JSON reads the same.
        let body = Data(bytes[StateFileCodec.headerLine(bytes).count...])
        if (try? JSONDecoder().decode(StateDocument.self, from: body)) != document {
            fatalError("Foundation's JSONDecoder reads this body differently")
        }
    } catch {
        guard error.code == .corruptState || error.code == .unsupportedVersion, error.path == path else {
            fatalError("unexpected error for a state file: \(error.code): \(error)")
        }
    }
}

/// The input's body (after the first newline, or all of it) under a correct version-1 header.
private func repaired(_ bytes: [UInt8]) -> [UInt8] {
    var sequence = "0"
    var body = bytes[...]
    if let newline = bytes.prefix(StateFileCodec.maximumHeaderBytes).firstIndex(of: UInt8(ascii: "\n")) {
        let fields = String(decoding: bytes[..<newline], as: UTF8.self).split(separator: " ")
        if fields.count > 2, let number = UInt64(fields[2]) { sequence = String(number) }
        body = bytes[(newline + 1)...]
    }
    // With sorted keys the document's own "seq" is the last one in the body (after the journal's):
    // copying it into the header lets a mutation of the body alone reach the journal checks.
    let text = String(decoding: body, as: UTF8.self)
    if let range = text.range(of: "\"seq\":", options: .backwards) {
        let digits = text[range.upperBound...].prefix { $0.isNumber }
        if let number = UInt64(digits) { sequence = String(number) }
    }
    let header = "\(StateFileCodec.magic) \(StateFileCodec.version) \(sequence) \(body.count) \(StateFileCodec.hex(CRC32.checksum(body)))\n"
    return Array(header.utf8) + body
}
