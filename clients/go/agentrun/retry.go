package agentrun

import (
	"math"
	"math/rand"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Verdict is what to do about a failed call: the one retry policy of the Python SDK
// (agentrun/_retry.py), the same in every client.
type Verdict int

const (
	// Retry the same request after a delay.
	Retry Verdict = iota
	// Split a request over a size or count limit and send its halves.
	Split
	// GiveUp: another attempt is answered the same.
	GiveUp
)

var transient = map[codes.Code]bool{
	codes.Unavailable: true, codes.DeadlineExceeded: true, codes.Aborted: true, codes.Canceled: true,
}

var refused = map[codes.Code]bool{
	codes.InvalidArgument: true, codes.NotFound: true, codes.AlreadyExists: true,
	codes.FailedPrecondition: true, codes.OutOfRange: true, codes.PermissionDenied: true,
	codes.Unauthenticated: true, codes.Unimplemented: true,
}

var tooLarge = regexp.MustCompile(`(?i)larger than max|message too large|max_runs_per_message`)

// RetryDelay is the google.rpc.RetryInfo delay a failed call's status carries, if any.
func RetryDelay(err error) (time.Duration, bool) {
	s, ok := status.FromError(err)
	if !ok {
		return 0, false
	}
	for _, detail := range s.Proto().GetDetails() {
		if !strings.HasSuffix(detail.GetTypeUrl(), "/google.rpc.RetryInfo") {
			continue
		}
		// RetryInfo { google.protobuf.Duration retry_delay = 1; }, read without genproto.
		data := detail.GetValue()
		for len(data) > 0 {
			number, kind, n := protowire.ConsumeTag(data)
			if n < 0 {
				break
			}
			data = data[n:]
			if number == 1 && kind == protowire.BytesType {
				value, m := protowire.ConsumeBytes(data)
				if m < 0 {
					break
				}
				delay := &durationpb.Duration{}
				if proto.Unmarshal(value, delay) == nil {
					return delay.AsDuration(), true
				}
				data = data[m:]
				continue
			}
			m := protowire.ConsumeFieldValue(number, kind, data)
			if m < 0 {
				break
			}
			data = data[m:]
		}
	}
	return 0, false
}

// VerdictOf says what to do about err. A stream (a long-lived call that reconnects) retries
// every code but the refusals: a server killed mid-write can end one INTERNAL or UNKNOWN.
func VerdictOf(err error, stream bool) Verdict {
	if _, ok := RetryDelay(err); ok {
		return Retry
	}
	s, _ := status.FromError(err)
	code := s.Code()
	if transient[code] {
		return Retry
	}
	if stream {
		if refused[code] {
			return GiveUp
		}
		return Retry
	}
	if (code == codes.ResourceExhausted || code == codes.InvalidArgument) && tooLarge.MatchString(s.Message()) {
		return Split
	}
	return GiveUp
}

// Backoff is exponential backoff with jitter, capped; a server-given delay wins.
type Backoff struct {
	Initial, Max time.Duration
	Multiplier   float64
	Jitter       float64
}

// DefaultBackoff is the SDK's schedule: 0.25 s doubling to 30 s, 20 % jitter.
var DefaultBackoff = Backoff{Initial: 250 * time.Millisecond, Max: 30 * time.Second, Multiplier: 2, Jitter: 0.2}

// Delay is the wait after failed attempt `attempt` (from 1) of err.
func (b Backoff) Delay(attempt int, err error) time.Duration {
	if server, ok := RetryDelay(err); ok {
		return time.Duration(float64(server) * (1 + rand.Float64()*b.Jitter))
	}
	base := math.Min(float64(b.Max), float64(b.Initial)*math.Pow(b.Multiplier, float64(attempt-1)))
	return time.Duration(base * (1 - b.Jitter + 2*b.Jitter*rand.Float64()))
}
