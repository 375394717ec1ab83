// Command worker serves one stage of a workflow with a Go stage function: it reads the run,
// answers with a pathway and an output, and drains on SIGTERM or Ctrl-C (the tasks running
// finish and are settled, then it exits).
//
//	worker -workflow grading -stage triage -pathway solved [-work 100ms] [-exit-when-empty]
//
// The stage function here counts the run's messages and returns the pathway given (or none at a
// stage without pathways); a real one calls a model or a grader. The connection comes from
// $AGENTRUN_SERVER, $AGENTRUN_API_KEY and the $AGENTRUN_TLS_* variables.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/agentrun/agentrun/clients/go/agentrun"
	"github.com/agentrun/agentrun/clients/go/work"
)

func main() {
	server := flag.String("server", "", "server URL (default $AGENTRUN_SERVER, else "+agentrun.DefaultServer+")")
	workflow := flag.String("workflow", "", "the workflow")
	stage := flag.String("stage", "", "the stage this worker serves")
	pathway := flag.String("pathway", "", "the pathway each task takes (none at a terminal stage)")
	busy := flag.Duration("work", 0, "how long each task takes (a model call, say)")
	credits := flag.Uint("credits", 16, "tasks at once")
	exitWhenEmpty := flag.Bool("exit-when-empty", false, "exit once the stage holds no task")
	flag.Parse()
	if *workflow == "" || *stage == "" {
		fmt.Fprintln(os.Stderr, "worker: -workflow and -stage are required")
		os.Exit(2)
	}
	conn, err := agentrun.Dial(agentrun.Options{Server: *server})
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	}
	defer conn.Close()
	grade := func(ctx context.Context, task *work.Task) (string, any, error) {
		messages := 0
		for _, transcript := range task.AgentRun.GetTranscripts() {
			messages += len(transcript.GetMessages())
		}
		select {
		case <-time.After(*busy):
		case <-ctx.Done(): // revoked: stop
			return "", nil, ctx.Err()
		}
		return *pathway, map[string]any{"worker": "go", "messages": messages, "attempt": task.Attempt}, nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	worker := &work.Worker{
		Conn: conn, Workflow: *workflow, Stages: map[string]work.StageFunc{*stage: grade},
		Credits: uint32(*credits), ExitWhenEmpty: *exitWhenEmpty, Name: "go-example-worker",
	}
	summary, err := worker.Run(ctx)
	fmt.Printf("completed=%d failed=%d dead=%d revoked=%d\n", summary.Completed[*stage], summary.Failed[*stage], summary.Dead[*stage], summary.Revoked[*stage])
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}
