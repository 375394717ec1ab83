package work

// The Python SDK's tests of WorkProtocol (tests/unit/test_work_protocol.py), ported: the two
// implementations keep the same rules.

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

func at(seconds float64) time.Time {
	return time.Unix(0, int64(seconds*1e9))
}

func leases(deadline float64, numbers ...int) *pb.WorkResponse {
	batch := &pb.LeaseBatch{}
	for _, n := range numbers {
		batch.Leases = append(batch.Leases, &pb.Lease{
			TaskId: fmt.Sprint(n), LeaseId: fmt.Sprintf("L%d", n), Stage: "a", Attempt: 1,
			MaxAttempts: 3, Deadline: timestamppb.New(at(deadline)),
			AgentRun: &pb.AgentRun{Id: fmt.Sprintf("run-%d", n)},
		})
	}
	return &pb.WorkResponse{Kind: &pb.WorkResponse_Leases{Leases: batch}}
}

func acks(code int32, tasks ...string) *pb.WorkResponse {
	batch := &pb.AckBatch{}
	for _, task := range tasks {
		batch.Acks = append(batch.Acks, &pb.Ack{TaskId: task, LeaseId: "L" + task, Code: code})
	}
	return &pb.WorkResponse{Kind: &pb.WorkResponse_Acks{Acks: batch}}
}

func subscribed(resumed ...*pb.Ack) *pb.Subscribed {
	return &pb.Subscribed{SessionId: "s", IdleTimeout: durationpb.New(60 * time.Second), Resumed: resumed}
}

func kinds(requests []*pb.WorkRequest) []string {
	out := []string{}
	for _, r := range requests {
		out = append(out, fmt.Sprintf("%T", r.Kind))
	}
	return out
}

func started(t *testing.T, now float64) *Protocol {
	p := NewProtocol("w", []string{"a"}, 4)
	first, resumed := p.Subscribe(at(now))
	if first.GetSubscribe().GetCredits() != 4 || len(resumed) != 0 {
		t.Fatalf("subscribe: %v", first)
	}
	p.OnSubscribed(subscribed(), nil)
	return p
}

func TestSettlesAreBatchedOneMessagePerKindAndAckedInOrder(t *testing.T) {
	p := started(t, 100)
	p.OnResponse(leases(130, 1, 2, 3), at(100))
	one, two, three := p.Next(), p.Next(), p.Next()
	if !p.Complete(one, "next", nil) || !p.Complete(two, "next", nil) || !p.Fail(three, "boom", false, 2*time.Second) {
		t.Fatal("a held lease was not settled")
	}
	if p.Complete(one, "again", nil) {
		t.Fatal("settled twice")
	}
	written := p.Outgoing(at(101))
	want := []string{"*agentrunv1.WorkRequest_CompleteTasks", "*agentrunv1.WorkRequest_FailTasks"}
	if !reflect.DeepEqual(kinds(written), want) {
		t.Fatalf("written %v", kinds(written))
	}
	if n := len(written[0].GetCompleteTasks().Completions); n != 2 {
		t.Fatalf("%d completions in one message", n)
	}
	if written[1].GetFailTasks().Failures[0].RetryAfter.AsDuration() != 2*time.Second {
		t.Fatal("retry_after lost")
	}
	if p.Unsettled() != 3 || len(p.Held) != 0 {
		t.Fatalf("unsettled %d held %d", p.Unsettled(), len(p.Held))
	}
	p.OnResponse(acks(0, "1", "2"), at(101.5))
	p.OnResponse(acks(0, "3"), at(101.5))
	if p.Unsettled() != 0 || len(p.Refusals) != 0 {
		t.Fatalf("unsettled %d refusals %v", p.Unsettled(), p.Refusals)
	}
}

func TestADrainGoesBeforeTheReleasesAfterItAndEndsOnceNothingIsHeld(t *testing.T) {
	p := started(t, 100)
	p.OnResponse(leases(130, 1, 2), at(100))
	first := p.Next()
	p.Drain()
	p.Release(first, 0)
	want := []string{"*agentrunv1.WorkRequest_Drain", "*agentrunv1.WorkRequest_ReleaseTasks"}
	if got := kinds(p.Outgoing(at(100.5))); !reflect.DeepEqual(got, want) {
		t.Fatalf("written %v", got)
	}
	if p.Finished() {
		t.Fatal("finished with lease 2 held")
	}
	p.Close()
	if got := kinds(p.Outgoing(at(100.6))); !reflect.DeepEqual(got, want[1:]) {
		t.Fatalf("written %v", got)
	}
	if !p.Finished() || !p.DoneWriting() {
		t.Fatal("not finished after close")
	}
}

func TestExtensionsAndHeartbeatsComeDueOnTheirOwn(t *testing.T) {
	p := started(t, 100) // idle timeout 60 s: a heartbeat after 20 s of silence
	p.OnResponse(leases(160, 1), at(100))
	if got := p.NextWriteAt(at(100)); !got.Equal(at(101)) {
		t.Fatalf("next write at %v", got)
	}
	if len(p.Outgoing(at(119))) != 0 {
		t.Fatal("wrote before anything was due")
	}
	if got := p.Outgoing(at(120.5)); len(got) != 1 || got[0].GetHeartbeat() == nil {
		t.Fatalf("no heartbeat: %v", got)
	}
	extension := p.Outgoing(at(131))
	if len(extension) != 1 || extension[0].GetExtendLeases().Extensions[0].LeaseDuration.AsDuration() != 60*time.Second {
		t.Fatalf("no extension: %v", extension)
	}
	if len(p.Outgoing(at(131.5))) != 0 {
		t.Fatal("a second extension in flight")
	}
	ack := &pb.Ack{TaskId: "1", LeaseId: "L1", Deadline: timestamppb.New(at(191))}
	p.OnResponse(&pb.WorkResponse{Kind: &pb.WorkResponse_Acks{Acks: &pb.AckBatch{Acks: []*pb.Ack{ack}}}}, at(131.6))
	if !p.Held["1"].Deadline.Equal(at(191)) {
		t.Fatal("the extension's deadline was not taken")
	}
}

func TestARefusedCompletionFailsTheAttemptWithTheServersReason(t *testing.T) {
	p := started(t, 100)
	p.OnResponse(leases(130, 1), at(100))
	p.Complete(p.Next(), "no-such-pathway", nil)
	p.Outgoing(at(100.1))
	refusal := &pb.Ack{TaskId: "1", LeaseId: "L1", Code: 3, Message: "pathway 'x' is not a pathway"}
	p.OnResponse(&pb.WorkResponse{Kind: &pb.WorkResponse_Acks{Acks: &pb.AckBatch{Acks: []*pb.Ack{refusal}}}}, at(100.2))
	if len(p.Refusals) != 1 || p.Refusals[0].Code != 3 {
		t.Fatalf("refusals %v", p.Refusals)
	}
	failure := p.Outgoing(at(100.3))
	item := failure[0].GetFailTasks().Failures[0]
	if !item.NonRetryable || item.Error != "the server refused the worker's completion: pathway 'x' is not a pathway" {
		t.Fatalf("failure %v", item)
	}
}

func TestAReconnectResumesWhatIsHeldAndResendsWhatWasNeverAcked(t *testing.T) {
	p := started(t, 100)
	p.OnResponse(leases(130, 1, 2, 3), at(100))
	p.Complete(p.Next(), "next", nil)
	p.Outgoing(at(100.1)) // written, never acked: the stream breaks
	p.OnResponse(&pb.WorkResponse{Kind: &pb.WorkResponse_Reconnect{Reconnect: &pb.Reconnect{}}}, at(100.2))
	if !p.ReconnectAsked || !p.DoneWriting() || len(p.Outgoing(at(100.3))) != 0 {
		t.Fatal("wrote on a stream asked to reconnect")
	}
	again, resumed := p.Subscribe(at(101))
	refs := again.GetSubscribe().Resume
	if len(refs) != 2 || refs[0].TaskId != "2" || refs[1].TaskId != "3" {
		t.Fatalf("resumed %v", refs)
	}
	kept := &pb.Ack{Code: 0, Deadline: timestamppb.New(at(130))}
	revoked := p.OnSubscribed(subscribed(kept, &pb.Ack{Code: 9, Message: "expired"}), resumed)
	if len(revoked) != 1 || revoked[0].Lease.TaskId != "3" || revoked[0].Reason != "not resumed: expired" {
		t.Fatalf("revoked %v", revoked)
	}
	resent := p.Outgoing(at(101.1))
	if len(resent) != 1 || resent[0].GetCompleteTasks().Completions[0].TaskId != "1" {
		t.Fatalf("resent %v", resent)
	}
	p.OnResponse(acks(9, "1"), at(101.2))
	if !p.Refusals[len(p.Refusals)-1].Resent {
		t.Fatal("a resend's refusal not marked as resent")
	}
}

func TestARevokedLeaseIsDroppedAndNeverSettled(t *testing.T) {
	p := started(t, 100)
	p.OnResponse(leases(130, 1, 2), at(100))
	revoked := p.OnResponse(&pb.WorkResponse{Kind: &pb.WorkResponse_Revoked{Revoked: &pb.LeasesRevoked{
		Leases: []*pb.RevokedLease{{TaskId: "2", LeaseId: "L2", Reason: pb.RevokeReason_REVOKE_REASON_CANCELLED}},
	}}}, at(100.5))
	if len(revoked) != 1 || revoked[0].Reason != "cancelled" {
		t.Fatalf("revoked %v", revoked)
	}
	if len(p.Ready) != 1 || p.Ready[0].TaskId != "1" {
		t.Fatalf("ready %v", p.Ready)
	}
	if p.Complete(revoked[0].Lease, "next", nil) {
		t.Fatal("a revoked lease was settled")
	}
}
