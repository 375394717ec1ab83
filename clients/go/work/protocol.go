// Package work is the worker's side of agentrun's Work protocol in Go: Protocol, the rules as a
// state machine with no I/O (a port of the Python SDK's agentrun.work.WorkProtocol, the
// reference), and Worker, which drives it over a gRPC stream across reconnects and runs a stage
// function per lease, as the Python Runner does.
//
// The rules Protocol keeps: the server pushes at most `credits` leases not yet settled; settles
// (complete, fail, release) are queued and written in batches, one message per kind, each
// answered by one AckBatch in order; a lease still held when half of it has passed is extended;
// with nothing else written for a third of the server's idle timeout a heartbeat is; a revoked
// lease is dropped and its task told to stop; a drain is written before any release queued after
// it; on a new stream the leases held are resumed and unacknowledged settles written again (a
// repeat is answered as the first was); a server shutting down asks for a reconnect.
package work

import (
	"sort"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

// Status codes of acks (google.rpc.Code).
const (
	codeOK                 = 0
	codeInvalidArgument    = 3
	codeFailedPrecondition = 9
)

type kind int

const (
	completeKind kind = iota
	failKind
	releaseKind
	extendKind
	numKinds
)

// Held is a lease this worker holds and has not settled.
type Held struct {
	Lease *pb.Lease
	// Deadline is when the lease ends unless extended.
	Deadline time.Time
	// Duration is the lease's length when granted, used for each extension.
	Duration  time.Duration
	extending bool
}

// Refusal is a settle the server refused (an ack with a code other than OK).
type Refusal struct {
	TaskID  string
	Kind    string
	Code    int32
	Message string
	// Resent: it was written again after a reconnect (a refusal then is expected).
	Resent bool
}

// Revocation is a lease the server took back (or did not resume): its task must stop and is
// never settled.
type Revocation struct {
	Lease  *pb.Lease
	Reason string
}

type written struct {
	kind  kind
	items []settle
}

type settle struct {
	taskID, leaseID string
	completion      *pb.TaskCompletion
	failure         *pb.TaskFailure
	release         *pb.TaskRelease
	extension       *pb.LeaseExtension
}

// Protocol is one worker's Work session across the streams that carry it. No I/O, no clock: the
// caller writes what Outgoing returns, hands over what it reads, and says when a stream starts.
type Protocol struct {
	Workflow        string
	Stages          []string
	Credits         uint32
	NotifyWhenEmpty bool
	Worker          string
	Held            map[string]*Held
	Subscribed      *pb.Subscribed
	Refusals        []Refusal
	Ready           []*pb.Lease
	Empty           bool
	Draining        bool
	Closing         bool
	ReconnectAsked  bool
	pending         [numKinds][]settle
	written         []written
	resent          map[[2]string]bool
	drainPending    bool
	idleTimeout     time.Duration
	lastWrite       time.Time
}

// NewProtocol starts a session serving stages of workflow with credits leases at once.
func NewProtocol(workflow string, stages []string, credits uint32) *Protocol {
	return &Protocol{
		Workflow: workflow, Stages: stages, Credits: credits,
		Held: map[string]*Held{}, resent: map[[2]string]bool{},
	}
}

// Subscribe is the first message of a new stream, resuming every lease held, and the leases it
// resumes in order (pass them to OnSubscribed).
func (p *Protocol) Subscribe(now time.Time) (*pb.WorkRequest, []*pb.Lease) {
	p.ReconnectAsked = false
	p.lastWrite = now
	subscribe := &pb.Subscribe{
		Workflow: p.Workflow, Credits: p.Credits, Worker: p.Worker,
		NotifyWhenEmpty: p.NotifyWhenEmpty,
	}
	for _, stage := range p.Stages {
		subscribe.Stages = append(subscribe.Stages, &pb.StageSubscription{Stage: stage})
	}
	resumed := make([]*pb.Lease, 0, len(p.Held))
	for _, held := range p.Held {
		resumed = append(resumed, held.Lease)
	}
	sort.Slice(resumed, func(i, j int) bool { return resumed[i].TaskId < resumed[j].TaskId })
	for _, lease := range resumed {
		subscribe.Resume = append(subscribe.Resume, &pb.LeaseRef{TaskId: lease.TaskId, LeaseId: lease.LeaseId})
	}
	return &pb.WorkRequest{Kind: &pb.WorkRequest_Subscribe{Subscribe: subscribe}}, resumed
}

// OnSubscribed takes the server's answer to Subscribe (which resumed `resumed`, in order) and
// returns the leases it did not resume. Settles the last stream never heard back about are
// queued again.
func (p *Protocol) OnSubscribed(subscribed *pb.Subscribed, resumed []*pb.Lease) []Revocation {
	p.Subscribed = subscribed
	p.idleTimeout = 0
	if subscribed.IdleTimeout != nil {
		p.idleTimeout = subscribed.IdleTimeout.AsDuration()
	}
	var revoked []Revocation
	for i, lease := range resumed {
		if i >= len(subscribed.Resumed) {
			break
		}
		ack := subscribed.Resumed[i]
		held := p.Held[lease.TaskId]
		if held == nil || held.Lease.LeaseId != lease.LeaseId {
			continue // settled meanwhile: the settle goes out below
		}
		if ack.Code == codeOK {
			held.Deadline = ack.Deadline.AsTime()
			held.extending = false
		} else {
			revoked = append(revoked, Revocation{p.revoke(held), "not resumed: " + ack.Message})
		}
	}
	for _, w := range p.written {
		if w.kind == extendKind {
			continue // redone when they come due
		}
		p.pending[w.kind] = append(append([]settle{}, w.items...), p.pending[w.kind]...)
		for _, item := range w.items {
			p.resent[[2]string{item.taskID, item.leaseID}] = true
		}
	}
	p.written = nil
	for _, held := range p.Held {
		held.extending = false // an extension written on a broken stream is lost
	}
	p.drainPending = p.Draining // a new session knows nothing of the old drain
	return revoked
}

// OnResponse takes a message from the server and returns the leases it took back.
func (p *Protocol) OnResponse(response *pb.WorkResponse, now time.Time) []Revocation {
	switch kind := response.Kind.(type) {
	case *pb.WorkResponse_Leases:
		for _, lease := range kind.Leases.Leases {
			deadline := lease.Deadline.AsTime()
			duration := deadline.Sub(now)
			if duration < 0 {
				duration = 0
			}
			p.Held[lease.TaskId] = &Held{Lease: lease, Deadline: deadline, Duration: duration}
			p.Ready = append(p.Ready, lease)
		}
		p.Empty = false
	case *pb.WorkResponse_Acks:
		p.onAcks(kind.Acks)
	case *pb.WorkResponse_Revoked:
		var revoked []Revocation
		for _, item := range kind.Revoked.Leases {
			held := p.Held[item.TaskId]
			if held != nil && held.Lease.LeaseId == item.LeaseId {
				revoked = append(revoked, Revocation{p.revoke(held), strings.ToLower(strings.TrimPrefix(item.Reason.String(), "REVOKE_REASON_"))})
			}
		}
		return revoked
	case *pb.WorkResponse_StagesEmpty:
		p.Empty = true
	case *pb.WorkResponse_Reconnect:
		p.ReconnectAsked = true // the server is shutting down: close our side, read to the end
	}
	return nil
}

func (p *Protocol) revoke(held *Held) *pb.Lease {
	delete(p.Held, held.Lease.TaskId)
	for i, lease := range p.Ready {
		if lease == held.Lease {
			p.Ready = append(p.Ready[:i], p.Ready[i+1:]...)
			break
		}
	}
	return held.Lease
}

var kindNames = [numKinds]string{"complete_tasks", "fail_tasks", "release_tasks", "extend_leases"}

func (p *Protocol) onAcks(batch *pb.AckBatch) {
	if len(p.written) == 0 {
		p.Refusals = append(p.Refusals, Refusal{Code: -1, Message: "an ack batch no message awaits"})
		return
	}
	w := p.written[0]
	p.written = p.written[1:]
	for _, ack := range batch.Acks {
		held := p.Held[ack.TaskId]
		mine := held != nil && held.Lease.LeaseId == ack.LeaseId
		if w.kind == extendKind && mine {
			held.extending = false
			if ack.Code == codeOK {
				held.Deadline = ack.Deadline.AsTime()
			}
		}
		key := [2]string{ack.TaskId, ack.LeaseId}
		resent := p.resent[key]
		delete(p.resent, key)
		if ack.Code == codeInvalidArgument && (w.kind == completeKind || w.kind == releaseKind) {
			// Refused as malformed, the lease is still held on the server: fail the attempt
			// with the server's reason rather than leave it leased until it expires.
			verb := map[kind]string{completeKind: "completion", releaseKind: "release"}[w.kind]
			p.pending[failKind] = append(p.pending[failKind], settle{
				taskID: ack.TaskId, leaseID: ack.LeaseId,
				failure: &pb.TaskFailure{
					TaskId: ack.TaskId, LeaseId: ack.LeaseId,
					Error:        "the server refused the worker's " + verb + ": " + ack.Message,
					NonRetryable: w.kind == completeKind,
				},
			})
		}
		if ack.Code != codeOK {
			p.Refusals = append(p.Refusals, Refusal{ack.TaskId, kindNames[w.kind], ack.Code, ack.Message, resent})
		}
	}
}

// Holds says whether lease is still this worker's to settle.
func (p *Protocol) Holds(lease *pb.Lease) bool {
	held := p.Held[lease.TaskId]
	return held != nil && held.Lease.LeaseId == lease.LeaseId
}

// Complete queues the completion of a held lease with a pathway ("" at a terminal stage) and an
// optional output; false if the lease is no longer held.
func (p *Protocol) Complete(lease *pb.Lease, pathway string, output *pb.Value) bool {
	return p.settle(lease, completeKind, settle{completion: &pb.TaskCompletion{
		TaskId: lease.TaskId, LeaseId: lease.LeaseId, Pathway: pathway, Output: output,
	}})
}

// Fail queues the failure of a held lease's attempt, retried by the server unless nonRetryable
// or its attempts are spent; retryAfter > 0 overrides the backoff.
func (p *Protocol) Fail(lease *pb.Lease, message string, nonRetryable bool, retryAfter time.Duration) bool {
	failure := &pb.TaskFailure{TaskId: lease.TaskId, LeaseId: lease.LeaseId, Error: message, NonRetryable: nonRetryable}
	if retryAfter > 0 {
		failure.RetryAfter = durationpb.New(retryAfter)
	}
	return p.settle(lease, failKind, settle{failure: failure})
}

// Release queues the hand-back of a held lease: ready again at once (or after `after`), no
// attempt spent.
func (p *Protocol) Release(lease *pb.Lease, after time.Duration) bool {
	release := &pb.TaskRelease{TaskId: lease.TaskId, LeaseId: lease.LeaseId}
	if after > 0 {
		release.RetryAfter = durationpb.New(after)
	}
	return p.settle(lease, releaseKind, settle{release: release})
}

// Drain asks for no more leases; the session finishes once nothing is held.
func (p *Protocol) Drain() {
	if !p.Draining {
		p.Draining, p.drainPending = true, true
	}
}

// Close hands back the leases never handed out; after what is queued, this side closes.
func (p *Protocol) Close() {
	p.Closing = true
	for len(p.Ready) > 0 {
		lease := p.Ready[0]
		p.Ready = p.Ready[1:]
		p.Release(lease, 0)
	}
}

// Next hands out the next lease received, or nil.
func (p *Protocol) Next() *pb.Lease {
	if len(p.Ready) == 0 {
		return nil
	}
	lease := p.Ready[0]
	p.Ready = p.Ready[1:]
	return lease
}

func (p *Protocol) settle(lease *pb.Lease, k kind, item settle) bool {
	if !p.Holds(lease) {
		return false
	}
	delete(p.Held, lease.TaskId)
	item.taskID, item.leaseID = lease.TaskId, lease.LeaseId
	p.pending[k] = append(p.pending[k], item)
	return true
}

// Outgoing returns the messages to write now, in order: a drain first, then one message per kind
// of settle queued, then the extensions due, or a heartbeat if nothing was written for a third
// of the idle timeout. They count as written (their acks awaited) from here.
func (p *Protocol) Outgoing(now time.Time) []*pb.WorkRequest {
	if p.ReconnectAsked {
		return nil // what is queued goes on the next stream
	}
	var out []*pb.WorkRequest
	if p.drainPending {
		p.drainPending = false
		out = append(out, &pb.WorkRequest{Kind: &pb.WorkRequest_Drain{Drain: &pb.Drain{}}})
	}
	p.extensionsDue(now)
	for k := completeKind; k < numKinds; k++ {
		items := p.pending[k]
		if len(items) == 0 {
			continue
		}
		p.pending[k] = nil
		p.written = append(p.written, written{k, items})
		out = append(out, request(k, items))
	}
	if len(out) == 0 && p.idleTimeout > 0 && now.Sub(p.lastWrite) >= p.idleTimeout/3 {
		out = append(out, &pb.WorkRequest{Kind: &pb.WorkRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}})
	}
	if len(out) > 0 {
		p.lastWrite = now
	}
	return out
}

func request(k kind, items []settle) *pb.WorkRequest {
	switch k {
	case completeKind:
		m := &pb.CompleteTasks{}
		for _, item := range items {
			m.Completions = append(m.Completions, item.completion)
		}
		return &pb.WorkRequest{Kind: &pb.WorkRequest_CompleteTasks{CompleteTasks: m}}
	case failKind:
		m := &pb.FailTasks{}
		for _, item := range items {
			m.Failures = append(m.Failures, item.failure)
		}
		return &pb.WorkRequest{Kind: &pb.WorkRequest_FailTasks{FailTasks: m}}
	case releaseKind:
		m := &pb.ReleaseTasks{}
		for _, item := range items {
			m.Releases = append(m.Releases, item.release)
		}
		return &pb.WorkRequest{Kind: &pb.WorkRequest_ReleaseTasks{ReleaseTasks: m}}
	default:
		m := &pb.ExtendLeases{}
		for _, item := range items {
			m.Extensions = append(m.Extensions, item.extension)
		}
		return &pb.WorkRequest{Kind: &pb.WorkRequest_ExtendLeases{ExtendLeases: m}}
	}
}

func (p *Protocol) extensionsDue(now time.Time) {
	for _, held := range p.Held {
		if !held.extending && held.Deadline.Sub(now) < held.Duration/2 {
			held.extending = true
			p.pending[extendKind] = append(p.pending[extendKind], settle{
				taskID: held.Lease.TaskId, leaseID: held.Lease.LeaseId,
				extension: &pb.LeaseExtension{
					TaskId: held.Lease.TaskId, LeaseId: held.Lease.LeaseId,
					LeaseDuration: durationpb.New(held.Duration),
				},
			})
		}
	}
}

// DoneWriting says whether this side of the stream should close now: closing with nothing left
// to write, or asked to reconnect.
func (p *Protocol) DoneWriting() bool {
	if p.ReconnectAsked {
		return true
	}
	if !p.Closing {
		return false
	}
	for _, items := range p.pending {
		if len(items) > 0 {
			return false
		}
	}
	return true
}

// NextWriteAt is when Outgoing may next have something to write unprompted (an extension or a
// heartbeat coming due); at most a second from now.
func (p *Protocol) NextWriteAt(now time.Time) time.Time {
	soon := now.Add(time.Second)
	for _, held := range p.Held {
		if !held.extending {
			if due := held.Deadline.Add(-held.Duration / 2); due.Before(soon) {
				soon = due
			}
		}
	}
	if p.idleTimeout > 0 {
		if due := p.lastWrite.Add(p.idleTimeout / 3); due.Before(soon) {
			soon = due
		}
	}
	if soon.Before(now) {
		return now
	}
	return soon
}

// Unsettled counts the settles queued or written and not yet acknowledged.
func (p *Protocol) Unsettled() int {
	n := len(p.pending[completeKind]) + len(p.pending[failKind]) + len(p.pending[releaseKind])
	for _, w := range p.written {
		if w.kind != extendKind {
			n += len(w.items)
		}
	}
	return n
}

// Finished says whether the session is done taking leases: nothing held, and the stages are
// empty (with NotifyWhenEmpty), or it drains or closes.
func (p *Protocol) Finished() bool {
	return len(p.Held) == 0 && (p.Empty || p.Draining || p.Closing)
}
