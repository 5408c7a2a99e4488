import Foundation
import Testing
@testable import TabSync

/// Inputs that once crashed the state-file decoder (found with scripts/fuzz).
@Suite(.timeLimit(.minutes(1)))
struct StateDecoderRegressionTests {
    /// A well-formed file (right length and checksum) whose journal has more entries than its
    /// sequence number used to trap with an arithmetic overflow instead of being called corrupt.
    @Test func aJournalLongerThanTheSequenceIsCorruptNotACrash() throws {
        let entry = #"{"seq":0,"key":"k","old":null,"new":"v","origin":"o","instance":"i","time":1}"#
        let body = Array(#"{"store":"s","seq":0,"values":{},"journal":[\#(entry),\#(entry)]}"#.utf8)
        let file = Array("tabsync-state 1 0 \(body.count) \(StateFileCodec.hex(CRC32.checksum(body)))\n".utf8) + body
        #expect {
            try StateFileCodec.decode(file, path: "/s/app.state")
        } throws: { error in
            let error = error as! TabSyncError
            return error.code == .corruptState && error.path == "/s/app.state" && error.message.contains("journal is longer")
        }
    }
}
