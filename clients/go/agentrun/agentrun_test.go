package agentrun

import (
	"errors"
	"math/big"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestServerURLsReadAsThePythonSDKReadsThem(t *testing.T) {
	os.Unsetenv(EnvServer)
	for url, want := range map[string]string{
		"":                         DefaultServer,
		"grpcs://example.com:443/": "example.com:443",
		"grpc://10.0.0.1:50051":    "10.0.0.1:50051",
		"dns:///agentrun:50051":    "dns:///agentrun:50051",
	} {
		if got, _ := ResolveServer(url); got != want {
			t.Errorf("%q: %q, want %q", url, got, want)
		}
	}
	if _, tls := ResolveServer("grpcs://a:1"); tls == nil || !*tls {
		t.Error("grpcs:// is TLS")
	}
}

func TestAKeyIsNeverSentInPlaintextToAnotherMachine(t *testing.T) {
	_, _, err := Options{Server: "grpc://10.1.2.3:50051", APIKey: "ark_x"}.DialOptions()
	var config *ConfigError
	if !errors.As(err, &config) || !strings.Contains(err.Error(), "plaintext") {
		t.Fatalf("got %v", err)
	}
	if _, _, err := (Options{Server: "127.0.0.1:50051", APIKey: "ark_x"}).DialOptions(); err != nil {
		t.Fatalf("loopback refused: %v", err)
	}
	if _, _, err := (Options{Server: "10.1.2.3:50051", APIKey: "ark_x"}).DialOptions(); err != nil {
		t.Fatalf("a key to another machine turns TLS on, not an error: %v", err)
	}
}

func TestRetryInfoIsRetriedWhateverTheCode(t *testing.T) {
	info := []byte{0x0a, 0x02, 0x08, 0x03} // RetryInfo{retry_delay: {seconds: 3}}
	s := status.New(codes.ResourceExhausted, "slow down").Proto()
	s.Details = []*anypb.Any{{TypeUrl: "type.googleapis.com/google.rpc.RetryInfo", Value: info}}
	err := status.ErrorProto(s)
	if delay, ok := RetryDelay(err); !ok || delay != 3*time.Second {
		t.Fatalf("delay %v %v", delay, ok)
	}
	if VerdictOf(err, false) != Retry {
		t.Fatal("not retried")
	}
	if VerdictOf(status.Error(codes.PermissionDenied, "no"), true) != GiveUp {
		t.Fatal("a refusal retried")
	}
	if VerdictOf(status.Error(codes.Internal, "killed mid-write"), true) != Retry {
		t.Fatal("a broken stream not reopened")
	}
	tooLarge := status.Error(codes.ResourceExhausted, "Received message larger than max (5 vs. 4)")
	if VerdictOf(tooLarge, false) != Split {
		t.Fatal("not split")
	}
}

func TestValuesKeepIntegersApartFromFloats(t *testing.T) {
	huge, _ := new(big.Int).SetString("123456789012345678901234567890", 10)
	in := map[string]any{"n": 3, "x": 0.5, "s": "é", "l": []any{true, nil}, "big": huge}
	value, err := ToValue(in)
	if err != nil {
		t.Fatal(err)
	}
	out := FromValue(value).(map[string]any)
	if out["n"] != int64(3) || out["x"] != 0.5 || out["s"] != "é" || out["big"].(*big.Int).Cmp(huge) != 0 {
		t.Fatalf("round trip: %v", out)
	}
	if !reflect.DeepEqual(out["l"], []any{true, nil}) {
		t.Fatalf("list: %v", out["l"])
	}
	deep := any("leaf")
	for i := 0; i <= MaxValueDepth; i++ {
		deep = []any{deep}
	}
	if _, err := ToValue(deep); err == nil {
		t.Fatal("nesting past the limit accepted")
	}
}
