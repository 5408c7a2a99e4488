import Foundation
import Testing
import TabSync
import TabSyncPostgres

/// Issue 15, point 1: credentials never appear in errors, logs or `location`.
@Suite(.timeLimit(.minutes(1)))
struct CredentialsTests {
    @Test func aPasswordNeverAppearsInTheLocationOrInErrors() throws {
        let server = TestServer.shared
        let backend = try PostgresBackend(configuration: TestServer.configuration, store: TestServer.uniqueStore("credentials"))
        #expect(!backend.location.contains(server.password))
        #expect(!"\(backend.configuration)".contains(server.password))

        // A wrong password: the error says what failed, and shows neither password.
        let wrong = "wrong-\(UUID().uuidString)"
        var configuration = TestServer.configuration
        configuration.password = wrong
        #expect {
            _ = try PostgresBackend(configuration: configuration, store: TestServer.uniqueStore("credentials"))
        } throws: { error in
            let text = "\(error)"
            return !text.contains(wrong) && !text.contains(server.password) && (error as? TabSyncError)?.path == configuration.description
        }
    }

    @Test func aURLWithAPasswordIsRefusedWithoutShowingIt() {
        let secret = "s3cret-\(UUID().uuidString.prefix(6))"
        #expect {
            _ = try PostgresConfiguration(url: "postgres://app:\(secret)@db.example:5432/app")
        } throws: { error in
            let text = "\(error)"
            return (error as? TabSyncError)?.code == .invalidArgument && !text.contains(secret) && text.contains("PGPASSWORD")
        }
    }

    @Test func aRemoteHostRequiresTLSUnlessTheURLSaysOtherwise() throws {
        #expect(try PostgresConfiguration(url: "postgres://app@db.example/app").tls == .require)
        #expect(try PostgresConfiguration(url: "postgres://app@127.0.0.1/app").tls == .disable)
        #expect(try PostgresConfiguration(url: "postgres://app@db.example/app?sslmode=disable").tls == .disable)
    }
}
