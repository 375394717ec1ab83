// agentrun-uploader: uploads agent runs into a collection, one run per line of standard input in
// the protobuf JSON form of agentrun.v1.AgentRun; prints what became of them (partial success)
// and exits 1 if any run was rejected.
//
//   agentrun-uploader COLLECTION < runs.jsonl
//
// The connection comes from $AGENTRUN_SERVER, $AGENTRUN_API_KEY and $AGENTRUN_TLS_*.
#include <google/protobuf/util/json_util.h>

#include <iostream>
#include <string>

#include "agentrun/client.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: agentrun-uploader COLLECTION < runs.jsonl\n";
    return 2;
  }
  std::vector<agentrun::v1::AgentRun> runs;
  std::string line;
  for (int number = 1; std::getline(std::cin, line); ++number) {
    if (line.empty()) continue;
    agentrun::v1::AgentRun run;
    auto parsed = google::protobuf::util::JsonStringToMessage(line, &run);
    if (!parsed.ok()) {
      std::cerr << "agentrun-uploader: line " << number << ": " << parsed.ToString() << "\n";
      return 2;
    }
    runs.push_back(std::move(run));
  }
  try {
    auto channel = agentrun::Connect();
    auto stub = agentrun::v1::IngestionService::NewStub(channel);
    grpc::ClientContext context;
    agentrun::v1::CreateCollectionRequest request;
    request.set_name(argv[1]);
    agentrun::v1::CreateCollectionResponse created;
    grpc::Status status = stub->CreateCollection(&context, request, &created);
    if (!status.ok()) {
      std::cerr << "agentrun-uploader: create collection: " << status.error_message() << "\n";
      return 1;
    }
    auto result = agentrun::Upload(*stub, created.collection().id(), runs);
    std::cout << "accepted=" << result.accepted << " duplicates=" << result.duplicates
              << " rejected=" << result.rejected.size() << "\n";
    for (const auto& rejected : result.rejected) {
      std::cout << "rejected index=" << rejected.index() << " id=\"" << rejected.agent_run_id()
                << "\" reason=" << agentrun::v1::RejectionReason_Name(rejected.reason())
                << " field=\"" << rejected.field() << "\": " << rejected.message() << "\n";
    }
    return result.rejected.empty() ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "agentrun-uploader: " << error.what() << "\n";
    return 1;
  }
}
