package agentrun

import (
	"google.golang.org/grpc"

	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

// Client is a connection to a server and the services' generated clients on it.
type Client struct {
	Conn         *grpc.ClientConn
	Ingestion    pb.IngestionServiceClient
	Orchestrator pb.OrchestratorServiceClient
	Keys         pb.KeyServiceClient
}

// Connect dials a server as o says (see Options) and returns its clients.
func Connect(o Options) (*Client, error) {
	conn, err := Dial(o)
	if err != nil {
		return nil, err
	}
	return &Client{
		Conn:         conn,
		Ingestion:    pb.NewIngestionServiceClient(conn),
		Orchestrator: pb.NewOrchestratorServiceClient(conn),
		Keys:         pb.NewKeyServiceClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.Conn.Close() }
