// Command worker serves stages of a workflow with a Go stage function: it reads the run,
// answers with a pathway and an output, and drains on SIGTERM or Ctrl-C (the tasks running
// finish and are settled, then it exits).
//
//	worker -workflow grading -stage triage -pathway solved [-work 100ms] [-exit-when-empty]
//	worker -workflow bench -stage a,b,c -pathway next,next,   # several stages, a pathway each
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
	"strings"
	"syscall"
	"time"

	"github.com/agentrun/agentrun/clients/go/agentrun"
	"github.com/agentrun/agentrun/clients/go/work"
)

func main() {
	server := flag.String("server", "", "server URL (default $AGENTRUN_SERVER, else "+agentrun.DefaultServer+")")
	workflow := flag.String("workflow", "", "the workflow")
	stageList := flag.String("stage", "", "the stages this worker serves, comma-separated")
	pathwayList := flag.String("pathway", "", "the pathway each stage's tasks take, comma-separated (none at a terminal stage)")
	busy := flag.Duration("work", 0, "how long each task takes (a model call, say)")
	credits := flag.Uint("credits", 16, "tasks at once")
	exitWhenEmpty := flag.Bool("exit-when-empty", false, "exit once the stage holds no task")
	flag.Parse()
	if *workflow == "" || *stageList == "" {
		fmt.Fprintln(os.Stderr, "worker: -workflow and -stage are required")
		os.Exit(2)
	}
	conn, err := agentrun.Dial(agentrun.Options{Server: *server})
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	}
	defer conn.Close()
	stages := strings.Split(*stageList, ",")
	pathways := strings.Split(*pathwayList, ",")
	pathwayOf := map[string]string{}
	for i, stage := range stages {
		if i < len(pathways) {
			pathwayOf[stage] = pathways[i]
		}
	}
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
		return pathwayOf[task.Stage], map[string]any{"worker": "go", "messages": messages, "attempt": task.Attempt}, nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	functions := map[string]work.StageFunc{}
	for _, stage := range stages {
		functions[stage] = grade
	}
	worker := &work.Worker{
		Conn: conn, Workflow: *workflow, Stages: functions,
		Credits: uint32(*credits), ExitWhenEmpty: *exitWhenEmpty, Name: "go-example-worker",
	}
	summary, err := worker.Run(ctx)
	total := func(counts map[string]int) (n int) {
		for _, count := range counts {
			n += count
		}
		return n
	}
	fmt.Printf("completed=%d failed=%d dead=%d revoked=%d\n", total(summary.Completed), total(summary.Failed), total(summary.Dead), total(summary.Revoked))
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
	if total(summary.Dead) > 0 {
		os.Exit(3) // tasks ended dead, as the Python Runner says it
	}
}
