package work

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"runtime"
	"time"

	"google.golang.org/grpc"

	"github.com/agentrun/agentrun/clients/go/agentrun"
	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

// Task is one leased task handed to a stage function: the lease as the server sent it (TaskId,
// Stage, Attempt, MaxAttempts, AgentRun, CollectionId, ...) and the previous stage's output.
type Task struct {
	*pb.Lease
	// Input is the previous stage's output as Go values (see agentrun.FromValue), or nil.
	Input any
}

// StageFunc does one stage of one task, as a Python Runner stage function does: it returns the
// pathway to take ("" at a stage without pathways) and an optional JSON-like output (see
// agentrun.ToValue) handed to the next stage. An error fails the attempt, retried with backoff
// while attempts remain; wrap it with Permanent to fail the task for good, or return
// RetryAfter(d) to hand the task back to run again after d without spending an attempt. ctx is
// cancelled when the lease is revoked (the task was cancelled or its lease expired).
type StageFunc func(ctx context.Context, task *Task) (pathway string, output any, err error)

type permanent struct{ err error }

func (p permanent) Error() string { return p.err.Error() }
func (p permanent) Unwrap() error { return p.err }

// Permanent marks a stage function's error as final: the task is dead at once (a dead letter),
// not retried.
func Permanent(err error) error { return permanent{err} }

type retryAfter struct{ after time.Duration }

func (r retryAfter) Error() string { return fmt.Sprintf("run again in %s", r.after) }

// RetryAfter hands the task back to run again after d, no attempt spent (a rate limit, an
// external state not yet reached), as the Python Runner's Retry(after=...).
func RetryAfter(d time.Duration) error { return retryAfter{d} }

// Summary counts what a Worker did, by stage.
type Summary struct {
	Completed, Failed, Dead, Retried, Revoked map[string]int
}

// Worker takes leases of its stages over one Work stream and runs each stage function on them
// (a goroutine per lease, at most Credits at once), as the Python Runner does: settles are
// batched, leases extended while their tasks run, the stream reopened and its leases resumed
// when it breaks or the server restarts, and cancelling Run's context drains: no new leases,
// the running tasks finish and are settled, then Run returns.
type Worker struct {
	// Conn is the connection (agentrun.Dial or agentrun.Connect's Client.Conn).
	Conn *grpc.ClientConn
	// Workflow and Stages: the stage functions, by stage name.
	Workflow string
	Stages   map[string]StageFunc
	// Credits is how many tasks run at once (default 16).
	Credits uint32
	// ExitWhenEmpty returns from Run once the stages hold no task (notify_when_empty).
	ExitWhenEmpty bool
	// Name identifies the worker in the server's logs (default "go-worker").
	Name string
	// Backoff paces reconnects (default agentrun.DefaultBackoff).
	Backoff agentrun.Backoff
	// Logger receives what the worker says (default: the standard logger).
	Logger *log.Logger
}

type outcome struct {
	lease   *pb.Lease
	pathway string
	output  any
	err     error
}

type running struct {
	cancel context.CancelFunc
}

// Run works until ctx is cancelled (then drains), the stages are empty (with ExitWhenEmpty), or
// the server refuses the stream for good (the error: UNAUTHENTICATED, PERMISSION_DENIED, a
// workflow or stage NOT_FOUND, ...). Other failures reconnect.
func (w *Worker) Run(ctx context.Context) (Summary, error) {
	stages := make([]string, 0, len(w.Stages))
	for stage := range w.Stages {
		stages = append(stages, stage)
	}
	credits := w.Credits
	if credits == 0 {
		credits = 16
	}
	p := NewProtocol(w.Workflow, stages, credits)
	p.NotifyWhenEmpty = w.ExitWhenEmpty
	p.Worker = w.Name
	if p.Worker == "" {
		p.Worker = "go-worker"
	}
	backoff := w.Backoff
	if backoff == (agentrun.Backoff{}) {
		backoff = agentrun.DefaultBackoff
	}
	logger := w.Logger
	if logger == nil {
		logger = log.Default()
	}
	r := &run{
		w: w, p: p, logger: logger, outcomes: make(chan outcome, credits),
		running: map[string]running{},
		summary: Summary{map[string]int{}, map[string]int{}, map[string]int{}, map[string]int{}, map[string]int{}},
	}
	client := pb.NewOrchestratorServiceClient(w.Conn)
	for attempt := 1; ; attempt++ {
		streamed, err := r.stream(ctx, client)
		if p.Closing && p.Unsettled() == 0 && len(r.running) == 0 {
			return r.summary, nil
		}
		if streamed {
			attempt = 1
		}
		var delay time.Duration
		if err != nil {
			if agentrun.VerdictOf(err, true) == agentrun.GiveUp {
				r.cancelAll()
				return r.summary, err
			}
			delay = backoff.Delay(attempt, err)
			logger.Printf("agentrun: work stream broke (%v); reconnecting in %s, %d leases held", err, delay.Round(time.Millisecond), len(p.Held))
		} else {
			delay = backoff.Delay(attempt, nil)
			logger.Printf("agentrun: work stream ended; reconnecting in %s, %d leases held", delay.Round(time.Millisecond), len(p.Held))
		}
		r.wait(ctx, delay)
	}
}

type run struct {
	w        *Worker
	p        *Protocol
	logger   *log.Logger
	outcomes chan outcome
	running  map[string]running
	summary  Summary
}

// wait sleeps for delay while tasks keep finishing (their settles queue for the next stream).
func (r *run) wait(ctx context.Context, delay time.Duration) {
	timer := time.NewTimer(delay)
	defer timer.Stop()
	for {
		select {
		case <-timer.C:
			return
		case o := <-r.outcomes:
			r.settle(o)
		case <-ctx.Done():
			r.drain()
			if r.p.Finished() && len(r.running) == 0 && !r.p.Closing {
				r.p.Close()
			}
			ctx = context.Background() // drained once; keep waiting for the timer
		}
	}
}

func (r *run) drain() {
	if r.p.Draining {
		return
	}
	r.p.Drain()
	for lease := r.p.Next(); lease != nil; lease = r.p.Next() {
		r.p.Release(lease, 0)
	}
}

func (r *run) cancelAll() {
	for _, task := range r.running {
		task.cancel()
	}
}

// stream runs one Work stream to its end; streamed says it got as far as `subscribed`.
func (r *run) stream(ctx context.Context, client pb.OrchestratorServiceClient) (bool, error) {
	p := r.p
	streamCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	call, err := client.Work(streamCtx)
	if err != nil {
		return false, err
	}
	subscribe, resumed := p.Subscribe(time.Now())
	if err := call.Send(subscribe); err != nil && err != io.EOF {
		return false, err
	}
	first, err := call.Recv()
	if err != nil {
		if err == io.EOF {
			return false, nil
		}
		return false, err
	}
	subscribed := first.GetSubscribed()
	if subscribed == nil {
		return false, errors.New("agentrun: the server's first Work message was not `subscribed`")
	}
	r.revoked(p.OnSubscribed(subscribed, resumed))
	responses := make(chan *pb.WorkResponse)
	ended := make(chan error, 1)
	go func() {
		for {
			response, err := call.Recv()
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				ended <- err
				close(responses)
				return
			}
			responses <- response
		}
	}()
	sentClose := false
	done := ctx.Done()
	for {
		now := time.Now()
		r.start(ctx)
		if !sentClose {
			for _, request := range p.Outgoing(now) {
				if err := call.Send(request); err != nil {
					break // the reader gets the status
				}
			}
		}
		if !p.Closing && p.Finished() && len(r.running) == 0 && p.Unsettled() == 0 {
			p.Close()
		}
		if p.DoneWriting() && !sentClose {
			sentClose = true
			_ = call.CloseSend()
		}
		timer := time.NewTimer(time.Until(p.NextWriteAt(time.Now())))
		select {
		case response, ok := <-responses:
			if !ok {
				timer.Stop()
				return true, <-ended
			}
			r.revoked(p.OnResponse(response, time.Now()))
			r.refusals()
		case o := <-r.outcomes:
			r.settle(o)
			r.settleFinished() // one message for every task that finished meanwhile
		case <-done:
			r.drain()
			done = nil
		case <-timer.C:
		}
		timer.Stop()
	}
}

// start runs the stage function on every lease received and not yet handed out.
func (r *run) start(ctx context.Context) {
	for lease := r.p.Next(); lease != nil; lease = r.p.Next() {
		function := r.w.Stages[lease.Stage]
		if function == nil || r.p.Draining {
			r.p.Release(lease, 0)
			continue
		}
		taskCtx, cancel := context.WithCancel(context.Background())
		r.running[lease.TaskId+"/"+lease.LeaseId] = running{cancel}
		task := &Task{Lease: lease}
		if lease.Input != nil {
			task.Input = agentrun.FromValue(lease.Input)
		}
		go func(lease *pb.Lease) {
			o := outcome{lease: lease}
			defer func() {
				if recovered := recover(); recovered != nil {
					o.err = fmt.Errorf("stage function panicked: %v", recovered)
				}
				r.outcomes <- o
			}()
			o.pathway, o.output, o.err = function(taskCtx, task)
		}(lease)
	}
}

// settleFinished settles every outcome already waiting, without blocking: tasks that finish
// together are settled in one message per kind, not one message each.
func (r *run) settleFinished() {
	for {
		select {
		case o := <-r.outcomes:
			r.settle(o)
		default:
			if len(r.running) == 0 {
				return
			}
			// Tasks still running may be about to finish: let them, once, before writing.
			runtime.Gosched()
			select {
			case o := <-r.outcomes:
				r.settle(o)
			default:
				return
			}
		}
	}
}

func (r *run) settle(o outcome) {
	key := o.lease.TaskId + "/" + o.lease.LeaseId
	if task, ok := r.running[key]; ok {
		task.cancel()
		delete(r.running, key)
	}
	stage := o.lease.Stage
	if !r.p.Holds(o.lease) {
		return // revoked meanwhile: never settled
	}
	var after retryAfter
	var final permanent
	switch {
	case errors.As(o.err, &after):
		r.summary.Retried[stage]++
		r.p.Release(o.lease, after.after)
	case errors.As(o.err, &final):
		r.logger.Printf("agentrun: task %s (%s) failed for good: %v", o.lease.TaskId, stage, o.err)
		r.summary.Dead[stage]++
		r.p.Fail(o.lease, o.err.Error(), true, 0)
	case o.err != nil:
		r.logger.Printf("agentrun: task %s (%s) attempt %d/%d failed: %v", o.lease.TaskId, stage, o.lease.Attempt, o.lease.MaxAttempts, o.err)
		r.summary.Failed[stage]++
		if o.lease.Attempt >= o.lease.MaxAttempts {
			r.summary.Dead[stage]++
		}
		r.p.Fail(o.lease, o.err.Error(), false, 0)
	default:
		var output *pb.Value
		if o.output != nil {
			value, err := agentrun.ToValue(o.output)
			if err != nil {
				r.summary.Dead[stage]++
				r.p.Fail(o.lease, "stage function returned an output that is not JSON-like: "+err.Error(), true, 0)
				return
			}
			output = value
		}
		r.summary.Completed[stage]++
		r.p.Complete(o.lease, o.pathway, output)
	}
}

func (r *run) revoked(revocations []Revocation) {
	for _, revocation := range revocations {
		r.summary.Revoked[revocation.Lease.Stage]++
		if task, ok := r.running[revocation.Lease.TaskId+"/"+revocation.Lease.LeaseId]; ok {
			task.cancel()
		}
		r.logger.Printf("agentrun: task %s (%s) revoked: %s", revocation.Lease.TaskId, revocation.Lease.Stage, revocation.Reason)
	}
}

func (r *run) refusals() {
	for _, refusal := range r.p.Refusals {
		if !refusal.Resent {
			r.logger.Printf("agentrun: task %s: the server refused its %s: %s", refusal.TaskID, refusal.Kind, refusal.Message)
		}
	}
	r.p.Refusals = nil
}
