// Package agentrun is the Go client of agentrun: a connection made with the SDK's defaults, the
// services' generated clients on it, and an uploader with per-run answers. Workers are in the
// work package.
package agentrun

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// Options say how to reach a server. Fields left empty come from the environment, as in the
// Python SDK's Connection: EnvServer, EnvAPIKey, EnvTLS, EnvTLSCA, EnvTLSCert, EnvTLSKey and
// EnvTLSServerName.
//
// TLS is on when TLS says so, the URL is grpcs:// or https://, a CA or a client certificate is
// given, or an API key goes to an address that is not this machine's (Temporal's rule). An API
// key is never sent in plaintext to another machine unless AllowPlaintextKey is set.
type Options struct {
	// Server is host:port, a URL with one of URLSchemes, or a gRPC target (dns:///name:port).
	// Empty: $AGENTRUN_SERVER, else DefaultServer.
	Server string
	// APIKey is sent as "authorization: Bearer <key>". Empty: $AGENTRUN_API_KEY.
	APIKey string
	// TLS forces TLS on or off. Nil: $AGENTRUN_TLS (1/0), else decided as above.
	TLS *bool
	// CAFile is a PEM CA bundle to verify the server with (empty: $AGENTRUN_TLS_CA, else the
	// system's roots).
	CAFile string
	// CertFile and KeyFile are a PEM client certificate and its key, for mTLS.
	CertFile, KeyFile string
	// ServerName is the name the server's certificate is verified against, when it differs
	// from the address.
	ServerName string
	// AllowPlaintextKey sends an API key without TLS to another machine (behind a TLS sidecar).
	AllowPlaintextKey bool
}

// ConfigError is a setting that cannot work; its message names the setting.
type ConfigError struct{ Message string }

func (e *ConfigError) Error() string { return e.Message }

func orEnv(value, name string) string {
	if value != "" {
		return value
	}
	return os.Getenv(name)
}

// ResolveServer returns the gRPC target of a server URL, and whether its scheme asks for TLS
// (nil: it does not say).
func ResolveServer(server string) (string, *bool) {
	url := orEnv(server, EnvServer)
	if url == "" {
		url = DefaultServer
	}
	for _, scheme := range URLSchemes {
		if strings.HasPrefix(url, scheme.Prefix) {
			secure := scheme.TLS
			return strings.TrimRight(strings.TrimPrefix(url, scheme.Prefix), "/"), &secure
		}
	}
	return url, nil
}

func isLoopback(target string) bool {
	if strings.HasPrefix(target, "unix:") {
		return true
	}
	address := target
	if strings.HasPrefix(address, "dns:") {
		address = strings.TrimLeft(strings.TrimPrefix(address, "dns:"), "/")
		if i := strings.Index(address, "/"); i >= 0 {
			address = address[i+1:]
		}
	}
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		host = address
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

func envTLS() (*bool, error) {
	value := strings.ToLower(strings.TrimSpace(os.Getenv(EnvTLS)))
	on, off := true, false
	switch value {
	case "":
		return nil, nil
	case "1", "true", "yes", "on":
		return &on, nil
	case "0", "false", "no", "off":
		return &off, nil
	}
	return nil, &ConfigError{fmt.Sprintf("$%s: %q; use 1 or 0", EnvTLS, value)}
}

// bearer sends the API key with every call.
type bearer struct{ key string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.key}, nil
}

// RequireTransportSecurity is false: Dial decides where a key may go in plaintext (loopback).
func (b bearer) RequireTransportSecurity() bool { return false }

// DialOptions returns the gRPC dial options for o: credentials, the API key, message limits and
// keepalive.
func (o Options) DialOptions() (string, []grpc.DialOption, error) {
	target, urlTLS := ResolveServer(o.Server)
	key := orEnv(o.APIKey, EnvAPIKey)
	ca := orEnv(o.CAFile, EnvTLSCA)
	cert := orEnv(o.CertFile, EnvTLSCert)
	keyFile := orEnv(o.KeyFile, EnvTLSKey)
	serverName := orEnv(o.ServerName, EnvTLSServerName)
	local := isLoopback(target)
	useTLS := o.TLS
	if useTLS == nil {
		fromEnv, err := envTLS()
		if err != nil {
			return "", nil, err
		}
		useTLS = fromEnv
	}
	if useTLS == nil {
		useTLS = urlTLS
	}
	secure := ca != "" || cert != "" || (key != "" && !local)
	if useTLS != nil {
		secure = *useTLS
	}
	options := []grpc.DialOption{
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes),
		),
		// The server allows pings no more often than every 10 s.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`),
	}
	if !secure {
		if key != "" && !local && !o.AllowPlaintextKey {
			return "", nil, &ConfigError{fmt.Sprintf(
				"refusing to send the API key in plaintext to %s: use TLS (grpcs://, a CA file or "+
					"$%s=1), or AllowPlaintextKey if a TLS proxy on this machine carries the connection",
				target, EnvTLS)}
		}
		options = append(options, grpc.WithInsecure())
	} else {
		config := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12}
		if ca != "" {
			pem, err := os.ReadFile(ca)
			if err != nil {
				return "", nil, &ConfigError{fmt.Sprintf("CA file %s: %v", ca, err)}
			}
			config.RootCAs = x509.NewCertPool()
			if !config.RootCAs.AppendCertsFromPEM(pem) {
				return "", nil, &ConfigError{fmt.Sprintf("CA file %s: no PEM certificate in it", ca)}
			}
		}
		if (cert == "") != (keyFile == "") {
			return "", nil, &ConfigError{fmt.Sprintf(
				"CertFile and KeyFile ($%s, $%s): give both for a client certificate, or neither",
				EnvTLSCert, EnvTLSKey)}
		}
		if cert != "" {
			pair, err := tls.LoadX509KeyPair(cert, keyFile)
			if err != nil {
				return "", nil, &ConfigError{fmt.Sprintf("client certificate %s: %v", cert, err)}
			}
			config.Certificates = []tls.Certificate{pair}
		}
		options = append(options, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	}
	if key != "" {
		options = append(options, grpc.WithPerRPCCredentials(bearer{key}))
	}
	return target, options, nil
}

// Dial connects to a server as o says. The connection is made lazily: a server that is down
// fails the first call (UNAVAILABLE), not Dial.
func Dial(o Options) (*grpc.ClientConn, error) {
	target, options, err := o.DialOptions()
	if err != nil {
		return nil, err
	}
	return grpc.Dial(target, options...)
}
