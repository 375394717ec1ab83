package agentrun

import (
	"context"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

// UploadResult is what became of the runs of one Upload: partial success, as the service
// answers it. Rejected items' Index is the run's position in the slice given to Upload.
type UploadResult struct {
	// Accepted runs were stored by this upload.
	Accepted int
	// Duplicates were already stored in the collection (a resend after a lost answer lands
	// here too: run ids are idempotency keys).
	Duplicates int
	// Rejected runs were not stored, each with its reason and the field at fault.
	Rejected []*pb.RejectedAgentRun
}

// UploadOptions tune Upload; the zero value is the SDK's defaults.
type UploadOptions struct {
	// MaxMessageRuns is the most runs in one request message (default 1000, the server's
	// max_runs_per_message).
	MaxMessageRuns int
	// MaxMessageBytes is the most encoded run bytes in one request message (default 8 MiB, as
	// the Python AgentRunWriter's max_batch_bytes).
	MaxMessageBytes int
	// Backoff paces retries (default DefaultBackoff); MaxAttempts bounds them (default 10).
	Backoff     Backoff
	MaxAttempts int
}

type item struct {
	index int
	run   *pb.AgentRun
	size  int
}

// Upload streams runs into a collection (UploadAgentRuns) and returns what became of each. A
// failure that passes (UNAVAILABLE, or any with RetryInfo) is retried as the SDK's policy says,
// resending the call (already stored runs come back as duplicates); a call over the server's
// message limit is split in halves; a run alone over it is rejected TOO_LARGE. The error is the
// last failure when the runs could not all be delivered (the result holds what was).
func (c *Client) Upload(ctx context.Context, collectionID string, runs []*pb.AgentRun, options UploadOptions) (*UploadResult, error) {
	if options.MaxMessageRuns <= 0 {
		options.MaxMessageRuns = 1000
	}
	if options.MaxMessageBytes <= 0 {
		options.MaxMessageBytes = 8 << 20
	}
	if options.Backoff == (Backoff{}) {
		options.Backoff = DefaultBackoff
	}
	if options.MaxAttempts <= 0 {
		options.MaxAttempts = 10
	}
	items := make([]item, len(runs))
	for i, run := range runs {
		items[i] = item{i, run, proto.Size(run)}
	}
	result := &UploadResult{}
	return result, c.deliver(ctx, collectionID, items, options, result)
}

func (c *Client) deliver(ctx context.Context, collectionID string, items []item, options UploadOptions, result *UploadResult) error {
	for attempt := 1; ; attempt++ {
		response, err := c.uploadOnce(ctx, collectionID, items, options)
		if err == nil {
			result.Accepted += int(response.GetAcceptedCount())
			result.Duplicates += int(response.GetDuplicateCount())
			for _, rejected := range response.GetRejected() {
				if int(rejected.GetIndex()) < len(items) {
					rejected.Index = uint32(items[rejected.GetIndex()].index)
				}
				result.Rejected = append(result.Rejected, rejected)
			}
			return nil
		}
		switch VerdictOf(err, false) {
		case Split:
			if len(items) > 1 {
				middle := len(items) / 2
				if err := c.deliver(ctx, collectionID, items[:middle], options, result); err != nil {
					return err
				}
				return c.deliver(ctx, collectionID, items[middle:], options, result)
			}
			result.Rejected = append(result.Rejected, &pb.RejectedAgentRun{
				Index: uint32(items[0].index), AgentRunId: items[0].run.GetId(),
				Reason:  pb.RejectionReason_REJECTION_REASON_TOO_LARGE,
				Message: "the server refused the run as too large: " + err.Error(),
			})
			return nil
		case Retry:
			if attempt < options.MaxAttempts {
				select {
				case <-time.After(options.Backoff.Delay(attempt, err)):
					continue
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}
		return err
	}
}

func (c *Client) uploadOnce(ctx context.Context, collectionID string, items []item, options UploadOptions) (*pb.UploadAgentRunsResponse, error) {
	stream, err := c.Ingestion.UploadAgentRuns(ctx)
	if err != nil {
		return nil, err
	}
	message := &pb.UploadAgentRunsRequest{CollectionId: collectionID}
	size := 0
	for i, it := range items {
		message.AgentRuns = append(message.AgentRuns, it.run)
		size += it.size
		last := i == len(items)-1
		if last || len(message.AgentRuns) >= options.MaxMessageRuns || size+items[i+1].size > options.MaxMessageBytes {
			if err := stream.Send(message); err != nil {
				break // the status comes with CloseAndRecv
			}
			message = &pb.UploadAgentRunsRequest{CollectionId: collectionID}
			size = 0
		}
	}
	return stream.CloseAndRecv()
}
