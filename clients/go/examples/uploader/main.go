// Command uploader uploads agent runs into a collection: one run per line of its input, in the
// protobuf JSON form of agentrun.v1.AgentRun. It prints what became of them, as the service
// answers (partial success), and exits 1 if any run was rejected.
//
//	uploader -collection NAME [-server grpcs://host:port] < runs.jsonl
//
// The connection comes from $AGENTRUN_SERVER, $AGENTRUN_API_KEY and the $AGENTRUN_TLS_*
// variables unless flags say otherwise.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/agentrun/agentrun/clients/go/agentrun"
	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

func main() {
	server := flag.String("server", "", "server URL (default $AGENTRUN_SERVER, else "+agentrun.DefaultServer+")")
	collection := flag.String("collection", "", "the collection's name: created if it does not exist")
	flag.Parse()
	if *collection == "" {
		fmt.Fprintln(os.Stderr, "uploader: -collection is required")
		os.Exit(2)
	}
	client, err := agentrun.Connect(agentrun.Options{Server: *server})
	if err != nil {
		fmt.Fprintln(os.Stderr, "uploader:", err)
		os.Exit(2)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	var runs []*pb.AgentRun
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), agentrun.MaxMessageBytes)
	for line := 1; scanner.Scan(); line++ {
		run := &pb.AgentRun{}
		if err := protojson.Unmarshal(scanner.Bytes(), run); err != nil {
			fmt.Fprintf(os.Stderr, "uploader: line %d: %v\n", line, err)
			os.Exit(2)
		}
		runs = append(runs, run)
	}
	if err := scanner.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "uploader:", err)
		os.Exit(2)
	}
	created, err := client.Ingestion.CreateCollection(ctx, &pb.CreateCollectionRequest{Name: *collection})
	if err != nil {
		fmt.Fprintln(os.Stderr, "uploader: create collection:", err)
		os.Exit(1)
	}
	result, err := client.Upload(ctx, created.GetCollection().GetId(), runs, agentrun.UploadOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "uploader:", err)
		os.Exit(1)
	}
	fmt.Printf("accepted=%d duplicates=%d rejected=%d\n", result.Accepted, result.Duplicates, len(result.Rejected))
	for _, rejected := range result.Rejected {
		fmt.Printf("rejected index=%d id=%q reason=%s field=%q: %s\n", rejected.GetIndex(), rejected.GetAgentRunId(), rejected.GetReason(), rejected.GetField(), rejected.GetMessage())
	}
	if len(result.Rejected) > 0 {
		os.Exit(1)
	}
}
