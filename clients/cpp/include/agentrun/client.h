// agentrun's C++ client: a channel made with the SDK's defaults and rules, and an uploader with
// per-run answers. The services' generated stubs (agentrun/v1/*.grpc.pb.h) do the rest.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "agentrun/contract.h"
#include "agentrun/v1/ingestion_service.grpc.pb.h"
#include "agentrun/v1/orchestrator_service.grpc.pb.h"

namespace agentrun {

// How to reach a server. Empty fields come from the environment, as in the Python SDK's
// Connection: kEnvServer, kEnvApiKey, kEnvTls, kEnvTlsCa, kEnvTlsCert, kEnvTlsKey and
// kEnvTlsServerName.
//
// TLS is on when `tls` says so, the URL is grpcs:// or https://, a CA or a client certificate
// is given, or an API key goes to an address that is not this machine's. An API key is never
// sent in plaintext to another machine unless allow_plaintext_key.
struct Options {
  std::string server;   // host:port, a URL with one of kUrlSchemes, or a gRPC target
  std::string api_key;  // sent as "authorization: Bearer <key>"
  std::optional<bool> tls;
  std::string ca_file, cert_file, key_file, server_name;
  bool allow_plaintext_key = false;
};

// A setting that cannot work; what() names it.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The gRPC target of a server URL, and whether its scheme asks for TLS (nullopt: it does not
// say). Empty: $AGENTRUN_SERVER, else kDefaultServer.
std::pair<std::string, std::optional<bool>> ResolveServer(const std::string& server);

// A channel to the server `options` names, with the API key on every call, message limits of
// kMaxMessageBytes and keepalive. Throws ConfigError.
std::shared_ptr<grpc::Channel> Connect(const Options& options = {});

// What became of the runs of one Upload (partial success, as the service answers it); each
// rejected run's index is its position in the vector given to Upload.
struct UploadResult {
  int accepted = 0;
  int duplicates = 0;
  std::vector<v1::RejectedAgentRun> rejected;
};

struct UploadOptions {
  int max_message_runs = 1000;             // the server's max_runs_per_message
  size_t max_message_bytes = 8 << 20;      // as the Python AgentRunWriter's max_batch_bytes
  int max_attempts = 10;                   // UNAVAILABLE (and any status with RetryInfo) retried
  std::chrono::milliseconds timeout{300000};
};

// Streams runs into a collection (UploadAgentRuns) and returns what became of each. A failure
// that passes is retried with backoff, resending the call (stored runs come back as
// duplicates); a call over the server's message limit is split in halves; a run alone over it
// is rejected TOO_LARGE. Throws grpc's status as std::runtime_error when the runs could not be
// delivered.
UploadResult Upload(v1::IngestionService::StubInterface& stub, const std::string& collection_id,
                    const std::vector<v1::AgentRun>& runs, const UploadOptions& upload = {});

// The SDK's one retry policy (agentrun/_retry.py): the codes a call is retried on whatever the
// server says, and those another attempt is answered the same (a stream that ends with one is
// not reopened).
bool IsTransient(grpc::StatusCode code);
bool IsRefused(grpc::StatusCode code);

}  // namespace agentrun
