#include <grpcpp/support/client_interceptor.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "agentrun/client.h"

namespace agentrun {
namespace {

std::string OrEnv(const std::string& value, const char* name) {
  if (!value.empty()) return value;
  const char* found = std::getenv(name);
  return found ? found : "";
}

bool StartsWith(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

bool IsLoopback(std::string target) {
  if (StartsWith(target, "unix:")) return true;
  if (StartsWith(target, "dns:")) {
    target = target.substr(4);
    target.erase(0, target.find_first_not_of('/'));
    auto slash = target.find('/');
    if (slash != std::string::npos) target = target.substr(slash + 1);
  }
  std::string host = target;
  if (!host.empty() && host[0] == '[') {
    host = host.substr(1, host.find(']') - 1);
  } else if (std::count(host.begin(), host.end(), ':') == 1) {
    host = host.substr(0, host.find(':'));
  }
  return host == "localhost" || host == "::1" || StartsWith(host, "127.");
}

std::optional<bool> EnvTls() {
  std::string value = OrEnv("", kEnvTls);
  std::transform(value.begin(), value.end(), value.begin(), ::tolower);
  if (value.empty()) return std::nullopt;
  if (value == "1" || value == "true" || value == "yes" || value == "on") return true;
  if (value == "0" || value == "false" || value == "no" || value == "off") return false;
  throw ConfigError(std::string("$") + kEnvTls + ": \"" + value + "\"; use 1 or 0");
}

std::string ReadFile(const std::string& path, const std::string& what) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw ConfigError(what + " " + path + ": cannot be read");
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// Adds the API key to every call's metadata (call credentials are refused on plaintext
// channels, and a key to this machine's server may go in plaintext).
class Bearer : public grpc::experimental::Interceptor {
 public:
  explicit Bearer(std::string value) : value_(std::move(value)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", value_});
    }
    methods->Proceed();
  }

 private:
  std::string value_;
};

class BearerFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerFactory(std::string key) : value_("Bearer " + std::move(key)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new Bearer(value_);
  }

 private:
  std::string value_;
};

}  // namespace

std::pair<std::string, std::optional<bool>> ResolveServer(const std::string& server) {
  std::string url = OrEnv(server, kEnvServer);
  if (url.empty()) url = kDefaultServer;
  for (const auto& scheme : kUrlSchemes) {
    if (StartsWith(url, scheme.prefix)) {
      url = url.substr(std::string(scheme.prefix).size());
      while (!url.empty() && url.back() == '/') url.pop_back();
      return {url, scheme.tls};
    }
  }
  return {url, std::nullopt};
}

std::shared_ptr<grpc::Channel> Connect(const Options& options) {
  auto [target, url_tls] = ResolveServer(options.server);
  std::string key = OrEnv(options.api_key, kEnvApiKey);
  std::string ca = OrEnv(options.ca_file, kEnvTlsCa);
  std::string cert = OrEnv(options.cert_file, kEnvTlsCert);
  std::string key_file = OrEnv(options.key_file, kEnvTlsKey);
  std::string server_name = OrEnv(options.server_name, kEnvTlsServerName);
  bool local = IsLoopback(target);
  std::optional<bool> tls = options.tls;
  if (!tls) tls = EnvTls();
  if (!tls) tls = url_tls;
  bool secure = tls ? *tls : (!ca.empty() || !cert.empty() || (!key.empty() && !local));

  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(static_cast<int>(kMaxMessageBytes));
  arguments.SetMaxSendMessageSize(static_cast<int>(kMaxMessageBytes));
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  arguments.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  arguments.SetLoadBalancingPolicyName("round_robin");
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (!secure) {
    if (!key.empty() && !local && !options.allow_plaintext_key) {
      throw ConfigError("refusing to send the API key in plaintext to " + target +
                        ": use TLS (grpcs://, a CA file or $AGENTRUN_TLS=1), or "
                        "allow_plaintext_key if a TLS proxy on this machine carries it");
    }
    credentials = grpc::InsecureChannelCredentials();
  } else {
    if (cert.empty() != key_file.empty()) {
      throw ConfigError(
          "cert_file and key_file ($AGENTRUN_TLS_CERT, $AGENTRUN_TLS_KEY): give both for a "
          "client certificate, or neither");
    }
    grpc::SslCredentialsOptions ssl;
    if (!ca.empty()) ssl.pem_root_certs = ReadFile(ca, "CA file");
    if (!cert.empty()) {
      ssl.pem_cert_chain = ReadFile(cert, "client certificate");
      ssl.pem_private_key = ReadFile(key_file, "client key");
    }
    if (!server_name.empty()) arguments.SetSslTargetNameOverride(server_name);
    credentials = grpc::SslCredentials(ssl);
  }
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (!key.empty()) interceptors.push_back(std::make_unique<BearerFactory>(key));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, arguments,
                                                                 std::move(interceptors));
}

bool IsTransient(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED ||
         code == grpc::StatusCode::ABORTED || code == grpc::StatusCode::CANCELLED;
}

bool IsRefused(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::UNIMPLEMENTED:
      return true;
    default:
      return false;
  }
}

}  // namespace agentrun
