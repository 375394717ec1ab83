// agentrun-conformance: the C++ driver of agentrun's conformance scenario
// (tests/conformance/scenario.json; its "comment" says the rules): the generated C++ stubs at the
// level of the proto3 JSON mapping, as every language's driver works. scripts/conformance.py
// (make conformance) starts a server, makes the keys and runs it:
//
//   agentrun-conformance --server HOST:PORT --keys KEYS.json --scenario scenario.json
//
// It prints a line per step, then "passed N/M"; it exits 1 if a step failed. The scenario is
// read as a google.protobuf.Value, so no JSON library beyond protobuf's is needed.
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <thread>

#include "agentrun/client.h"

using google::protobuf::ListValue;
using google::protobuf::Message;
using google::protobuf::Struct;
using google::protobuf::Value;
namespace v1 = agentrun::v1;

namespace {

constexpr auto kReceive = std::chrono::seconds(10);
const char* kCodes[] = {"OK",        "CANCELLED",          "UNKNOWN",      "INVALID_ARGUMENT",
                        "DEADLINE_EXCEEDED", "NOT_FOUND",  "ALREADY_EXISTS",
                        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                        "ABORTED",   "OUT_OF_RANGE",       "UNIMPLEMENTED", "INTERNAL",
                        "UNAVAILABLE", "DATA_LOSS",        "UNAUTHENTICATED"};

struct Failed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string CodeName(const grpc::Status& status) {
  int code = static_cast<int>(status.error_code());
  return code >= 0 && code < 17 ? kCodes[code] : "UNKNOWN";
}

Value Parse(const std::string& json) {
  Value value;
  auto parsed = google::protobuf::util::JsonStringToMessage(json, &value);
  if (!parsed.ok()) throw std::runtime_error("JSON: " + parsed.ToString());
  return value;
}

std::string Print(const Message& message) {
  std::string json;
  (void)google::protobuf::util::MessageToJsonString(message, &json);
  return json;
}

Value ToValue(const Message& message) { return Parse(Print(message)); }

void FromValue(const Value& value, Message* message) {
  auto parsed = google::protobuf::util::JsonStringToMessage(Print(value), message);
  if (!parsed.ok()) throw std::runtime_error("request: " + parsed.ToString());
}

Value Str(const std::string& text) {
  Value value;
  value.set_string_value(text);
  return value;
}

// The text of a scalar, numbers without a fraction as integers ("1", not "1.0").
std::string Text(const Value& value) {
  switch (value.kind_case()) {
    case Value::kStringValue:
      return value.string_value();
    case Value::kNumberValue: {
      std::ostringstream out;
      double number = value.number_value();
      if (number == static_cast<long long>(number)) {
        out << static_cast<long long>(number);
      } else {
        out << number;
      }
      return out.str();
    }
    case Value::kBoolValue:
      return value.bool_value() ? "true" : "false";
    default:
      return Print(value);
  }
}

bool Empty(const Value* value) {
  if (value == nullptr) return true;
  switch (value->kind_case()) {
    case Value::kNullValue:
    case Value::KIND_NOT_SET:
      return true;
    case Value::kStringValue:
      return value->string_value().empty();
    case Value::kListValue:
      return value->list_value().values_size() == 0;
    case Value::kStructValue:
      return value->struct_value().fields().empty();
    default:
      return false;
  }
}

const Value* Field(const Value* value, const std::string& key) {
  if (value == nullptr || !value->has_struct_value()) return nullptr;
  auto found = value->struct_value().fields().find(key);
  return found == value->struct_value().fields().end() ? nullptr : &found->second;
}

Value Lookup(const Struct& saved, const std::string& path) {
  Value root;
  *root.mutable_struct_value() = saved;
  const Value* value = &root;
  std::stringstream parts(path);
  std::string part;
  while (value != nullptr && std::getline(parts, part, '.')) {
    if (value->has_list_value()) {
      size_t i = std::stoul(part);
      value = i < static_cast<size_t>(value->list_value().values_size())
                  ? &value->list_value().values(static_cast<int>(i))
                  : nullptr;
    } else {
      value = Field(value, part);
    }
  }
  return value == nullptr ? Str("") : *value;  // absent in the JSON mapping: the default
}

Value Substitute(const Value& value, const Struct& saved) {
  static const std::regex variable(R"(\$\{([^}]+)\})");
  Value out;
  if (value.has_string_value()) {
    const std::string& text = value.string_value();
    std::smatch whole;
    if (std::regex_match(text, whole, variable)) return Lookup(saved, whole[1]);
    std::string result;
    auto begin = std::sregex_iterator(text.begin(), text.end(), variable);
    size_t at = 0;
    for (auto it = begin; it != std::sregex_iterator(); ++it) {
      result += text.substr(at, it->position() - at) + Text(Lookup(saved, (*it)[1]));
      at = it->position() + it->length();
    }
    out.set_string_value(result + text.substr(at));
    return out;
  }
  if (value.has_list_value()) {
    out.mutable_list_value();  // an empty list stays a list
    for (const auto& item : value.list_value().values()) {
      *out.mutable_list_value()->add_values() = Substitute(item, saved);
    }
    return out;
  }
  if (value.has_struct_value()) {
    out.mutable_struct_value();  // {} stays an object: an empty message, a role, a drain
    for (const auto& [key, item] : value.struct_value().fields()) {
      (*out.mutable_struct_value()->mutable_fields())[key] = Substitute(item, saved);
    }
    return out;
  }
  return value;
}

// Fails where `actual` (proto3 JSON) is not a superset of `expected`.
void Match(const Value& expected, const Value* actual, const std::string& where) {
  if (expected.has_string_value() && expected.string_value() == "*") {
    if (Empty(actual)) throw Failed(where + ": expected a value, got none");
    return;
  }
  if (expected.has_struct_value()) {
    if (actual != nullptr && !actual->has_struct_value() && !Empty(actual)) {
      throw Failed(where + ": expected an object, got " + Print(*actual));
    }
    for (const auto& [key, item] : expected.struct_value().fields()) {
      Match(item, Field(actual, key), where.empty() ? key : where + "." + key);
    }
    return;
  }
  if (expected.has_list_value()) {
    int size = actual != nullptr && actual->has_list_value() ? actual->list_value().values_size() : 0;
    if (size != expected.list_value().values_size()) {
      throw Failed(where + ": expected " + std::to_string(expected.list_value().values_size()) +
                   " items, got " + (actual ? Print(*actual) : "none"));
    }
    for (int i = 0; i < size; ++i) {
      Match(expected.list_value().values(i), &actual->list_value().values(i),
            where + "[" + std::to_string(i) + "]");
    }
    return;
  }
  if (actual == nullptr || actual->kind_case() == Value::KIND_NOT_SET) {
    std::string text = Text(expected);
    if (text == "0" || text == "false" || text.empty()) return;
    throw Failed(where + ": expected " + text + ", got none");
  }
  if (Text(expected) != Text(*actual)) {
    throw Failed(where + ": expected " + Text(expected) + ", got " + Text(*actual));
  }
}

// One Work stream: responses read on a thread into a queue.
class WorkStream {
 public:
  WorkStream(v1::OrchestratorService::Stub& stub, const std::string& token) {
    if (!token.empty()) context_.AddMetadata("authorization", "Bearer " + token);
    stream_ = stub.Work(&context_);
    reader_ = std::thread([this] {
      v1::WorkResponse response;
      while (stream_->Read(&response)) Push({ToValue(response), ""});
      Push({Value(), CodeName(stream_->Finish())});
    });
  }
  ~WorkStream() {
    if (!closed_) stream_->WritesDone();
    context_.TryCancel();
    reader_.join();
  }
  void Send(const Value& json) {
    v1::WorkRequest request;
    FromValue(json, &request);
    stream_->Write(request);
  }
  void Close() {
    closed_ = true;
    stream_->WritesDone();
  }
  // The next message (end: the status code's name once the stream ended), or false on timeout.
  bool Next(std::chrono::milliseconds timeout, std::pair<Value, std::string>* message) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!ready_.wait_for(lock, timeout, [this] { return !queue_.empty(); })) return false;
    *message = queue_.front();
    queue_.pop_front();
    return true;
  }
  Value Receive(const std::string& kind) {
    for (auto it = buffered_.begin(); it != buffered_.end(); ++it) {
      if (Field(&*it, kind) != nullptr) {
        Value found = *it;
        buffered_.erase(it);
        return found;
      }
    }
    for (;;) {
      std::pair<Value, std::string> message;
      if (!Next(kReceive, &message)) throw Failed("no " + kind + " within 10 s");
      if (!message.second.empty()) throw Failed("the stream ended " + message.second);
      if (Field(&message.first, kind) != nullptr) return message.first;
      buffered_.push_back(message.first);
    }
  }

 private:
  void Push(std::pair<Value, std::string> message) {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(message));
    ready_.notify_one();
  }
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::WorkRequest, v1::WorkResponse>> stream_;
  std::thread reader_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::pair<Value, std::string>> queue_;
  std::vector<Value> buffered_;
  bool closed_ = false;
};

using Call = std::function<grpc::Status(grpc::ClientContext*, const Value& step, const Struct& saved,
                                        Value* answer)>;

template <typename Request, typename Response, typename Stub>
Call Unary(Stub* stub, grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*)) {
  return [stub, method](grpc::ClientContext* context, const Value& step, const Struct& saved,
                        Value* answer) {
    Request request;
    FromValue(Substitute(*Field(&step, "request"), saved), &request);
    Response response;
    grpc::Status status = (stub->*method)(context, request, &response);
    if (status.ok()) *answer = ToValue(response);
    return status;
  };
}

class Driver {
 public:
  Driver(std::shared_ptr<grpc::Channel> channel, Value keys)
      : ingestion_(v1::IngestionService::NewStub(channel)),
        orchestrator_(v1::OrchestratorService::NewStub(channel)),
        keys_(std::move(keys)) {
    auto* in = ingestion_.get();
    auto* orch = orchestrator_.get();
    calls_["IngestionService/CreateCollection"] = Unary(in, &v1::IngestionService::Stub::CreateCollection);
    calls_["IngestionService/GetAgentRun"] = Unary(in, &v1::IngestionService::Stub::GetAgentRun);
    calls_["OrchestratorService/ApplyWorkflow"] = Unary(orch, &v1::OrchestratorService::Stub::ApplyWorkflow);
    calls_["OrchestratorService/GetTask"] = Unary(orch, &v1::OrchestratorService::Stub::GetTask);
    calls_["OrchestratorService/RedriveTasks"] = Unary(orch, &v1::OrchestratorService::Stub::RedriveTasks);
    calls_["OrchestratorService/CancelTasks"] = Unary(orch, &v1::OrchestratorService::Stub::CancelTasks);
    calls_["OrchestratorService/EnqueueAgentRuns"] = Unary(orch, &v1::OrchestratorService::Stub::EnqueueAgentRuns);
    calls_["IngestionService/UploadAgentRuns"] = [in](grpc::ClientContext* context, const Value& step,
                                                      const Struct& saved, Value* answer) {
      v1::UploadAgentRunsResponse response;
      auto writer = in->UploadAgentRuns(context, &response);
      for (const auto& json : Field(&step, "requests")->list_value().values()) {
        v1::UploadAgentRunsRequest request;
        FromValue(Substitute(json, saved), &request);
        if (!writer->Write(request)) break;
      }
      writer->WritesDone();
      grpc::Status status = writer->Finish();
      if (status.ok()) *answer = ToValue(response);
      return status;
    };
  }

  void Run(const Value& step) {
    std::string token;
    if (const Value* as = Field(&step, "as")) token = Field(&keys_, as->string_value())->string_value();
    Value expect = Field(&step, "expect") ? Substitute(*Field(&step, "expect"), saved_) : Value();
    const Value* code = Field(&expect, "code");
    Value ok = Str("OK");
    if (const Value* call = Field(&step, "call")) {
      auto found = calls_.find(call->string_value());
      if (found == calls_.end()) throw Failed("no call " + call->string_value() + " in this driver");
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
      Value answer;
      answer.mutable_struct_value();
      grpc::Status status = found->second(&context, step, saved_, &answer);
      Value got = Str(CodeName(status));
      Match(code ? *code : ok, &got, "code");
      if (const Value* response = Field(&expect, "response")) Match(*response, &answer, "response");
      if (const Value* save = Field(&step, "save")) {
        for (const auto& [name, where] : save->struct_value().fields()) {
          (*saved_.mutable_fields())[name] = Lookup(answer.struct_value(), where.string_value());
        }
      }
      return;
    }
    std::string name = Field(&step, "stream")->string_value();
    if (const Value* open = Field(&step, "open")) {
      auto stream = std::make_unique<WorkStream>(*orchestrator_, token);
      Value subscribe;
      (*subscribe.mutable_struct_value()->mutable_fields())["subscribe"] = Substitute(*open, saved_);
      stream->Send(subscribe);
      std::pair<Value, std::string> first;
      if (!stream->Next(kReceive, &first)) throw Failed("no answer to subscribe");
      streams_[name] = std::move(stream);
      Value got = Str(first.second.empty() ? "OK" : first.second);
      Match(code ? *code : ok, &got, "code");
      if (first.second.empty()) {
        expect.mutable_struct_value()->mutable_fields()->erase("code");
        Match(expect, &first.first, "");
      }
      return;
    }
    WorkStream& stream = *streams_.at(name);
    if (const Value* send = Field(&step, "send")) stream.Send(Substitute(*send, saved_));
    if (const Value* receive = Field(&step, "receive")) {
      const std::string& kind = receive->string_value();
      if (kind == "leases") {
        int count = static_cast<int>(Field(&step, "count")->number_value());
        Value leases;
        leases.mutable_list_value();
        while (leases.list_value().values_size() < count) {
          Value message = stream.Receive("leases");
          for (const auto& lease : Field(Field(&message, "leases"), "leases")->list_value().values()) {
            *leases.mutable_list_value()->add_values() = lease;
          }
        }
        if (leases.list_value().values_size() > count) throw Failed("more leases than expected");
        if (Field(&step, "expect")) Match(expect, &leases, "leases");
        if (const Value* save = Field(&step, "save")) {
          for (int i = 0; i < save->list_value().values_size() && i < count; ++i) {
            (*saved_.mutable_fields())[save->list_value().values(i).string_value()] =
                leases.list_value().values(i);
          }
        }
        return;
      }
      Value message = stream.Receive(kind);
      const Value* body = Field(&message, kind);
      if (Field(&step, "expect")) Match(expect, body, kind);
      if (const Value* save = Field(&step, "save")) {
        for (const auto& [saveAs, where] : save->struct_value().fields()) {
          (*saved_.mutable_fields())[saveAs] = Lookup(body->struct_value(), where.string_value());
        }
      }
      return;
    }
    if (const Value* quiet = Field(&step, "quiet")) {
      std::pair<Value, std::string> message;
      auto wait = std::chrono::milliseconds(static_cast<long>(quiet->number_value() * 1000));
      if (stream.Next(wait, &message)) throw Failed("expected nothing, got " + Print(message.first));
      return;
    }
    if (const Value* close = Field(&step, "close"); close && close->bool_value()) {
      stream.Close();
      for (;;) {
        std::pair<Value, std::string> message;
        if (!stream.Next(kReceive, &message)) throw Failed("the stream did not end after the half-close");
        if (!message.second.empty()) {
          Value got = Str(message.second);
          Match(code ? *code : ok, &got, "code");
          return;
        }
      }
    }
  }

 private:
  std::unique_ptr<v1::IngestionService::Stub> ingestion_;
  std::unique_ptr<v1::OrchestratorService::Stub> orchestrator_;
  Value keys_;
  Struct saved_;
  std::map<std::string, Call> calls_;
  std::map<std::string, std::unique_ptr<WorkStream>> streams_;
};

std::string ReadAll(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i + 1 < argc; i += 2) flags[argv[i]] = argv[i + 1];
  try {
    Value scenario = Parse(ReadAll(flags.count("--scenario") ? flags["--scenario"]
                                                             : "tests/conformance/scenario.json"));
    Value keys = Parse(ReadAll(flags.at("--keys")));
    Driver driver(grpc::CreateChannel(flags.at("--server"), grpc::InsecureChannelCredentials()),
                  keys);
    const ListValue& steps = Field(&scenario, "steps")->list_value();
    int passed = 0;
    for (const auto& step : steps.values()) {
      const std::string& name = Field(&step, "name")->string_value();
      try {
        driver.Run(step);
        ++passed;
        std::cout << "ok   " << name << std::endl;
      } catch (const Failed& failure) {
        std::cout << "FAIL " << name << ": " << failure.what() << std::endl;
      }
    }
    std::cout << "passed " << passed << "/" << steps.values_size() << std::endl;
    return passed == steps.values_size() ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "agentrun-conformance: " << error.what() << "\n";
    return 2;
  }
}
