// Command ollama_render renders an Ollama Modelfile TEMPLATE the way Ollama's /api/chat does, so
// that lora2gguf can check the prompt Ollama would build without running Ollama.
//
// Input (stdin, JSON): {"template": "...", "system": "..." or null, "messages": [{"role", "content"}]}.
// Output (stdout): the rendered prompt, nothing else. Errors go to stderr with exit status 1.
//
// Standard library only (Go 1.19). What it mirrors, by file of github.com/ollama/ollama (written
// here from reading them, not copied):
//   - server/routes.go, ChatHandler: the Modelfile SYSTEM becomes a first system message when the
//     request's first message is not a system message and SYSTEM is not empty.
//   - template/template.go, Parse: text/template with option missingkey=zero and Ollama's extra
//     functions (json, currentDate, yesterdayDate, toTypeScriptType).
//   - template/template.go, Execute and collate: a template that names "messages" gets the map
//     System (every system message, joined by a blank line), Messages (consecutive messages of one
//     role merged with a blank line, tool messages kept apart), Tools, Response "", Think false,
//     ThinkLevel "", IsThinkSet false; each message exposes Role, Content, Thinking, Images,
//     ToolCalls, ToolName and ToolCallID. Prompt and Suffix are absent (missingkey=zero).
//   - server/prompt.go, chatPrompt/renderPrompt: one Execute over all messages (no truncation is
//     needed: the conversations checked fit the context).
//
// Not mirrored: templates without .Messages (Ollama's legacy prompt/response loop) are refused,
// images, tools and thinking-tag filtering (server/routes.go filterThinkTags, qwen3/deepseek-r1).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type request struct {
	Template string    `json:"template"`
	System   *string   `json:"system"`
	Messages []message `json:"messages"`
}

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// templateMessage has the fields Ollama exposes to a template for each message.
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     [][]byte
	ToolCalls  []toolCall
	ToolName   string
	ToolCallID string
}

type toolCall struct {
	ID       string
	Function toolCallFunction
}

type toolCallFunction struct {
	Index     int
	Name      string
	Arguments map[string]interface{}
}

// tools stands for Ollama's template tool list: empty here (requests carry no tools), printed as JSON.
type tools []interface{}

func (t tools) String() string {
	encoded, _ := json.Marshal(t)
	return string(encoded)
}

func templateFuncs() template.FuncMap {
	return template.FuncMap{
		"json": func(v interface{}) string {
			encoded, _ := json.Marshal(v)
			return string(encoded)
		},
		"currentDate": func(args ...string) string {
			return time.Now().Format("2006-01-02")
		},
		"yesterdayDate": func(args ...string) string {
			return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
		},
		// Ollama converts tool parameter properties; no tools are passed here, so any value is "any".
		"toTypeScriptType": func(v interface{}) string {
			return "any"
		},
	}
}

// identifiers lists the field and variable names a template uses, lower-cased, to decide as Ollama
// does whether it is a messages-style template.
func identifiers(node parse.Node, names map[string]bool) {
	switch n := node.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, child := range n.Nodes {
				identifiers(child, names)
			}
		}
	case *parse.ActionNode:
		identifiers(n.Pipe, names)
	case *parse.TemplateNode:
		identifiers(n.Pipe, names)
	case *parse.IfNode:
		identifiers(&n.BranchNode, names)
	case *parse.RangeNode:
		identifiers(&n.BranchNode, names)
	case *parse.WithNode:
		identifiers(&n.BranchNode, names)
	case *parse.BranchNode:
		identifiers(n.Pipe, names)
		identifiers(n.List, names)
		if n.ElseList != nil {
			identifiers(n.ElseList, names)
		}
	case *parse.PipeNode:
		if n == nil {
			return
		}
		for _, cmd := range n.Cmds {
			for _, arg := range cmd.Args {
				identifiers(arg, names)
			}
		}
	case *parse.FieldNode:
		for _, ident := range n.Ident {
			names[strings.ToLower(ident)] = true
		}
	case *parse.VariableNode:
		for _, ident := range n.Ident {
			names[strings.ToLower(ident)] = true
		}
	}
}

// chatMessages prepends the Modelfile SYSTEM as ChatHandler does, then collates as Execute does.
func chatMessages(req request) (string, []*templateMessage) {
	msgs := req.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && req.System != nil && *req.System != "" {
		msgs = append([]message{{Role: "system", Content: *req.System}}, msgs...)
	}
	var systems []string
	var collated []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		last := len(collated) - 1
		if last >= 0 && collated[last].Role == m.Role && m.Role != "tool" {
			collated[last].Content += "\n\n" + m.Content
			continue
		}
		collated = append(collated, &templateMessage{Role: m.Role, Content: m.Content})
	}
	return strings.Join(systems, "\n\n"), collated
}

func render(req request, out io.Writer) error {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(templateFuncs()).Parse(req.Template)
	if err != nil {
		return err
	}
	names := map[string]bool{}
	for _, t := range tmpl.Templates() {
		if t.Tree != nil {
			identifiers(t.Tree.Root, names)
		}
	}
	if !names["messages"] {
		return fmt.Errorf("the template does not use .Messages: Ollama would render it with its legacy " +
			"prompt/response loop, which this renderer does not mirror")
	}
	system, messages := chatMessages(req)
	var rendered bytes.Buffer
	err = tmpl.Execute(&rendered, map[string]interface{}{
		"System":     system,
		"Messages":   messages,
		"Tools":      tools(nil),
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
	if err != nil {
		return err
	}
	_, err = out.Write(rendered.Bytes())
	return err
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "reading the request from stdin:", err)
		os.Exit(1)
	}
	if err := render(req, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
