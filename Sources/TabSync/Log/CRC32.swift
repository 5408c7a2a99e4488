/// CRC-32 as in zlib, PNG and Ethernet (polynomial 0xEDB88320, reflected), so that any language's
/// standard library (Python's `zlib.crc32`, Go's `hash/crc32`) can check a state file or a log record.
///
/// Computed eight bytes at a time ("slicing by 8": eight tables, each the previous one advanced by
/// a byte).
enum CRC32 {
    /// `tables[k][b]`: the CRC contribution of byte `b` followed by `k` zero bytes.
    static let tables: [UInt32] = {
        var tables = [UInt32](repeating: 0, count: 8 * 256)
        for index in 0..<256 {
            var value = UInt32(index)
            for _ in 0..<8 {
                value = value & 1 == 1 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1
            }
            tables[index] = value
        }
        for slice in 1..<8 {
            for index in 0..<256 {
                let previous = tables[(slice - 1) * 256 + index]
                tables[slice * 256 + index] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
            }
        }
        return tables
    }()

    /// The CRC of `bytes`; with `continuing`, of the bytes checked before (whose CRC it is)
    /// followed by `bytes`, as zlib's `crc32(previous, bytes)`.
    static func checksum(_ bytes: some Sequence<UInt8>, continuing previous: UInt32 = 0) -> UInt32 {
        // Contiguous bytes (an array, Data) are read through a buffer pointer: iterating
        // Data byte by byte costs more than the table look-ups.
        bytes.withContiguousStorageIfAvailable { checksum($0, continuing: previous) } ?? checksum(Array(bytes), continuing: previous)
    }

    static func checksum(_ bytes: UnsafeRawBufferPointer, continuing previous: UInt32 = 0) -> UInt32 {
        checksum(bytes.assumingMemoryBound(to: UInt8.self), continuing: previous)
    }

    private static func checksum(_ bytes: UnsafeBufferPointer<UInt8>, continuing previous: UInt32) -> UInt32 {
        var crc: UInt32 = previous ^ 0xFFFF_FFFF
        tables.withUnsafeBufferPointer { table in
            var index = 0
            if let base = bytes.baseAddress {
                let raw = UnsafeRawPointer(base)
                while index + 8 <= bytes.count {
                    let low = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: index, as: UInt32.self)) ^ crc
                    let high = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: index + 4, as: UInt32.self))
                    crc = table[7 * 256 + Int(low & 0xFF)] ^ table[6 * 256 + Int((low >> 8) & 0xFF)]
                        ^ table[5 * 256 + Int((low >> 16) & 0xFF)] ^ table[4 * 256 + Int(low >> 24)]
                        ^ table[3 * 256 + Int(high & 0xFF)] ^ table[2 * 256 + Int((high >> 8) & 0xFF)]
                        ^ table[1 * 256 + Int((high >> 16) & 0xFF)] ^ table[Int(high >> 24)]
                    index += 8
                }
            }
            while index < bytes.count {
                crc = table[Int((crc ^ UInt32(bytes[index])) & 0xFF)] ^ (crc >> 8)
                index += 1
            }
        }
        return crc ^ 0xFFFF_FFFF
    }
}
