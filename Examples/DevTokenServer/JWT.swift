// DEVELOPMENT ONLY: HS256 JSON Web Tokens (RFC 7519 / RFC 7515) for the demo token server.
import Crypto
import Foundation

/// Claims carried by every access token the dev server issues.
struct AccessTokenClaims: Codable, Sendable, Equatable {
    var sub: String
    var iat: Int
    var exp: Int
    var jti: String
    var scope: String
    var client_id: String
}

/// Signs and verifies HS256 JWTs with a key that lives only as long as the process.
struct JWTSigner: Sendable {
    // swift-crypto 3.12's SymmetricKey is not Sendable, so keep the raw bytes.
    private let keyBytes: Data
    private var key: SymmetricKey { SymmetricKey(data: keyBytes) }

    /// A fresh random 256-bit key per run: tokens from an earlier run never verify.
    init(key: SymmetricKey = SymmetricKey(size: .bits256)) {
        self.keyBytes = key.withUnsafeBytes { Data($0) }
    }

    private static let header = Base64URL.encode(Data(#"{"alg":"HS256","typ":"JWT"}"#.utf8))

    func sign(_ claims: AccessTokenClaims) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let payload = Base64URL.encode(try encoder.encode(claims))
        let signingInput = "\(Self.header).\(payload)"
        let mac = HMAC<SHA256>.authenticationCode(for: Data(signingInput.utf8), using: key)
        return "\(signingInput).\(Base64URL.encode(Data(mac)))"
    }

    /// The claims of a token this process signed, or nil. Expiry is NOT checked here.
    func verify(_ token: String) -> AccessTokenClaims? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3,
              let headerData = Base64URL.decode(parts[0]),
              let header = try? JSONDecoder().decode([String: String].self, from: headerData),
              header["alg"] == "HS256",
              let signature = Base64URL.decode(parts[2]),
              let payload = Base64URL.decode(parts[1])
        else { return nil }
        let signingInput = Data("\(parts[0]).\(parts[1])".utf8)
        guard HMAC<SHA256>.isValidAuthenticationCode(signature, authenticating: signingInput, using: key) else {
            return nil
        }
        return try? JSONDecoder().decode(AccessTokenClaims.self, from: payload)
    }
}

/// base64url without padding (RFC 4648 §5, as JWS requires).
enum Base64URL {
    static func encode(_ data: Data) -> String {
        data.base64EncodedString()
            .replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    static func decode(_ text: some StringProtocol) -> Data? {
        var base64 = text
            .replacingOccurrences(of: "-", with: "+")
            .replacingOccurrences(of: "_", with: "/")
        guard !base64.contains("=") else { return nil }
        switch base64.count % 4 {
        case 0: break
        case 2: base64 += "=="
        case 3: base64 += "="
        default: return nil
        }
        return Data(base64Encoded: base64)
    }
}

/// Random opaque tokens and their storage keys.
enum OpaqueToken {
    /// 256 bits from the system CSPRNG, base64url encoded (43 characters).
    static func make() -> String {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<32).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        return Base64URL.encode(Data(bytes))
    }

    /// Tokens are stored by SHA-256 digest, never in the clear.
    static func digest(_ token: String) -> String {
        SHA256.hash(data: Data(token.utf8)).map { String(format: "%02x", $0) }.joined()
    }
}

/// Constant-time comparison for secrets (compares HMACs of both sides under a throwaway key).
enum Secret {
    private static let keyBytes = SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }
    private static var key: SymmetricKey { SymmetricKey(data: keyBytes) }

    static func equal(_ a: String, _ b: String) -> Bool {
        let macA = HMAC<SHA256>.authenticationCode(for: Data(a.utf8), using: key)
        return HMAC<SHA256>.isValidAuthenticationCode(Data(macA), authenticating: Data(b.utf8), using: key)
    }
}
